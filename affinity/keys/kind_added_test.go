package keys_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-affinity/caddy-affinity/affinity"
	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
)

// TestAddingAKeyKind adds a kind of key source as its one entry in kinds
// and uses it everywhere a kind is used, through the policy's exported
// surface alone: the Caddyfile, Validate, Select, the lookup, and the
// list the admin API offers.
func TestAddingAKeyKind(t *testing.T) {
	keys.AddKind(t, "user_agent", 42,
		func(r *http.Request) (string, bool) {
			ua := r.Header.Get("User-Agent")
			return ua, ua != ""
		},
		func(r *http.Request, v string) error { r.Header.Set("User-Agent", v); return nil })
	p := new(affinity.Policy)
	if err := p.UnmarshalCaddyfile(caddyfile.NewTestDispenser("affinity {\n key user_agent\n}")); err != nil {
		t.Fatalf("the Caddyfile does not take the new kind: %v", err)
	}
	err := new(affinity.Policy).UnmarshalCaddyfile(caddyfile.NewTestDispenser("affinity {\n key user_agent x\n}"))
	if err == nil || !strings.Contains(err.Error(), "takes no arguments") {
		t.Fatalf("the new kind's arguments are not checked: %v", err)
	}
	p.Secret = "test-secret-0123456789"
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := p.Provision(ctx); err != nil {
		t.Fatalf("provision: %v", err)
	}
	t.Cleanup(func() { _ = p.Cleanup() })
	pool := make(reverseproxy.UpstreamPool, 3)
	for i := range pool {
		pool[i] = &reverseproxy.Upstream{Host: new(reverseproxy.Host), Dial: t.Name() + "-u" + string(rune('0'+i)) + ":80"}
	}
	r := httptest.NewRequest(http.MethodGet, "http://example.com/", nil)
	r = r.WithContext(context.WithValue(r.Context(), caddyhttp.VarsCtxKey, map[string]any{}))
	r.Header.Set("User-Agent", "curl/8")
	up := p.Select(pool, r, httptest.NewRecorder())
	site := affinity.Site{Server: "srv0", Path: "/config/apps/http/servers/srv0/routes/0/handle/0",
		Handler: &reverseproxy.Handler{Upstreams: pool}, Policy: p}
	got := affinity.Explain(site, "user_agent", "", "curl/8", time.Now())
	if got.Error != "" || got.Upstream == nil || *got.Upstream != up.Dial || got.Decision != affinity.DecidedTable {
		t.Fatalf("the lookup by the new kind: %+v, Select chose %s", got, up.Dial)
	}
	listed := false
	for _, k := range keys.Kinds() {
		listed = listed || k.Name == "user_agent"
	}
	if !listed {
		t.Fatal("Kinds does not list the new kind")
	}
}
