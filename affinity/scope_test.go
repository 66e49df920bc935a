package affinity

import (
	"fmt"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
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
	for range 3 {
		if err = caddy.Load(namespacesConfig(t), true); err == nil {
			break
		}
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
