package affinity

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"

	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
	"github.com/caddy-affinity/caddy-affinity/internal/testredis"
)

// The namespace of every proxy is known at Provision (before the config
// serves, so that what other instances publish applies at once after a
// reload), and it is the one the running config's walk gives, so that
// snapshots written under either are read back under the other. Sites
// with hosts, several proxies of one site in handle blocks, and two
// servers; the shared store's namespaces differ between sites and do not
// depend on the listeners.
func TestNamespacesKnownAtProvision(t *testing.T) {
	// Free ports are picked, then bound by Caddy: another test's server
	// may take one in between; try again then.
	var err error
	for range 5 {
		if err = caddy.Load(namespacesConfig(t), true); err == nil {
			break
		}
		t.Logf("loading the config: %v; again on other ports", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	sites := Sites()
	if len(sites) != 6 {
		t.Fatalf("%d sites, want 6", len(sites))
	}
	shared := map[string]bool{}
	for _, s := range sites {
		id, ok := siteIdentity(s.Policy)
		if !ok {
			t.Fatalf("%s: no identity in the running config", s.Path)
		}
		if got, want := s.Policy.sessions.Scope(), scopeHash("site", id); got != want {
			t.Errorf("%s (%v): scope at Provision %x, the running config's %x (%s)", s.Path, s.Hosts, got, want, id)
		}
		shared[s.Policy.namespace] = true
	}
	if len(shared) != 6 {
		t.Errorf("%d shared-store namespaces for 6 proxies", len(shared))
	}
}

// namespacesConfig returns the config of TestNamespacesKnownAtProvision:
// sites a and b on one server, c on another, each with two proxies.
func namespacesConfig(t *testing.T) []byte {
	listen, dial := inProcessAddrs(t)
	listen2, _ := inProcessAddrs(t)
	port := listen[strings.LastIndex(listen, ":")+1:]
	port2 := listen2[strings.LastIndex(listen2, ":")+1:]
	site := func(hosts, port string) string {
		proxy := fmt.Sprintf(`reverse_proxy %s {
			lb_policy affinity {
				secret s
				store memory
			}
		}`, dial)
		return fmt.Sprintf("http://%s:%s {\n\thandle /a/* {\n\t\t%s\n\t}\n\thandle {\n\t\t%s\n\t}\n}\n", hosts, port, proxy, proxy)
	}
	cf := "{\n admin off\n}\n" + site("a.example", port) + site("b.example", port) + site("c.example", port2)
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), nil)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// Issue 15, fault 1: after a reload, the moves other instances publish
// through store redis apply to the new config's policy at once, before
// it serves any request (its namespace used to be known only from its
// first request, so the moves went to the shared namespace and were
// lost: 22 of 22 moved sessions went back to their old upstream).
func TestReloadFollowsPublishedMoves(t *testing.T) {
	rd := testredis.Start(t)
	listen, dial := inProcessAddrs(t)
	_, dial2 := inProcessAddrs(t)
	config := func(ttl int) []byte {
		return []byte(fmt.Sprintf(`{"admin":{"disabled":true,"config":{"persist":false}},
"apps":{"http":{"servers":{"s":{"listen":[%q],"automatic_https":{"disable":true},"routes":[{"match":[{"host":["app.example"]}],"handle":[
{"handler":"reverse_proxy","upstreams":[{"dial":%q},{"dial":%q}],"load_balancing":{"selection_policy":
{"policy":"affinity","secret":"s","disable_pin_cookie":true,"keys":[{"from":"cookie","name":"sid"}],
"session_ttl":"%ds","store":{"kind":"redis","address":%q}}}}]}]}}}}}`, listen, dial, dial2, ttl, rd.Addr))
	}
	if err := caddy.Load(config(600), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	policy := func() *Policy {
		sites := Sites()
		if len(sites) != 1 {
			t.Fatalf("%d sites", len(sites))
		}
		return sites[0].Policy
	}
	// The instance serves (a request through the site).
	req, _ := http.NewRequest(http.MethodGet, "http://"+listen+"/", nil)
	req.Host = "app.example"
	req.Header.Set("Cookie", "sid=first")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("the first request: %s", resp.Status)
	}
	p := policy()
	from, to := healthcheck.Get(dial).ID, healthcheck.Get(dial2).ID
	const n = 20
	for i := range n {
		p.sessions.Learn(sessionIDHash(fmt.Sprintf("s-%d", i)), from, sessions.Now(), nil)
	}
	// A reload that keeps the site (another ttl field would change the
	// keys: the same config, forced).
	if err := caddy.Load(config(600), true); err != nil {
		t.Fatal(err)
	}
	p2 := policy()
	if p2 == p {
		t.Fatal("the reload kept the old policy")
	}
	// Another instance of the site moves the sessions.
	other := sessions.NewStore(1000)
	defer other.Close()
	oh, err := other.Open(sessions.Options{Config: p2.Store, Namespace: p2.namespace, Scope: 9, TTL: 600, MaxSessions: p2.MaxSessions})
	if err != nil {
		t.Fatal(err)
	}
	defer oh.Close()
	for i := range n {
		k := sessionIDHash(fmt.Sprintf("s-%d", i))
		oh.Learn(k, from, sessions.Now(), nil)
		oh.Remember([]uint64{k}, to, sessions.Now(), nil)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		moved := 0
		for i := range n {
			if e, ok := p2.sessions.Peek(sessionIDHash(fmt.Sprintf("s-%d", i)), sessions.Now()); ok && e.Upstream() == to {
				moved++
			}
		}
		if moved == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d sessions moved by another instance followed on the reloaded config", moved, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
