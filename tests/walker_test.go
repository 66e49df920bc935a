package tests

import (
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// probeTarget is an upstream that only counts the drain probe's visits.
type probeTarget struct {
	dial   string
	probes atomic.Int64
}

func startProbeTargets(t *testing.T, n int) []*probeTarget {
	t.Helper()
	var out []*probeTarget
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		pt := &probeTarget{dial: l.Addr().String()}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/drain-status" {
				pt.probes.Add(1)
			}
			fmt.Fprint(w, "ok")
		})}
		go func() { _ = srv.Serve(l) }()
		t.Cleanup(func() { _ = srv.Close() })
		out = append(out, pt)
	}
	return out
}

// A reverse_proxy using the policy is seen wherever Caddy can hold one:
// in a named route (`&(name)` run by `invoke`), a `handle` block, a
// `route` block and `handle_errors`. Each appears in /affinity/lookup and
// on the status page (configured, with a share), and its probe runs. The
// named route was invisible before: the walker knew only routes, errors
// and subroutes.
func TestEveryPlaceOfAReverseProxyIsSeen(t *testing.T) {
	needCaddy(t)
	backends := startBackends(t, 2)
	targets := startProbeTargets(t, 8)
	groups := map[string][]*probeTarget{
		"named_routes":  targets[0:2],
		"handle":        targets[2:4],
		"route":         targets[4:6],
		"errors/routes": targets[6:8],
	}
	proxy := func(g string) string {
		ts := groups[g]
		return fmt.Sprintf(`reverse_proxy %s %s {
		lb_policy affinity {
			key cookie sid
			probe /drain-status {
				interval 200ms
			}
		}
	}`, ts[0].dial, ts[1].dial)
	}
	port := freePort(t)
	extra := fmt.Sprintf(`
&(app) {
	%s
}

http://127.0.0.1:%d {
	bind 127.0.0.1
	handle /named/* {
		invoke app
	}
	handle /handle/* {
		%s
	}
	route /route/* {
		%s
	}
	handle /fail/* {
		error 500
	}
	handle_errors {
		%s
	}
}
`, proxy("named_routes"), port, proxy("handle"), proxy("route"), proxy("errors/routes"))
	p := startCaddy(t, "walker", proxyConfig{Upstreams: addrsOf(backends), Policy: "key cookie session_id", Extra: extra})

	// Requests reach each place (the config is what it says).
	for _, path := range []string{"/named/x", "/handle/x", "/route/x", "/fail/x"} {
		status, _, body := obsDo(t, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d%s", port, path), nil)
		if status != http.StatusOK || string(body) != "ok" {
			t.Fatalf("GET %s: %d %q", path, status, body)
		}
	}

	var lookup struct {
		Policies []struct {
			Handler  string  `json:"handler"`
			Upstream *string `json:"upstream"`
			Decision string  `json:"decision"`
			Error    string  `json:"error"`
		} `json:"policies"`
	}
	obsGetJSON(t, p.Admin+"/affinity/lookup?key=abc&source=cookie&name=sid", &lookup)
	var status struct {
		Upstreams []struct {
			Upstream   string   `json:"upstream"`
			Share      *float64 `json:"share"`
			Configured bool     `json:"configured"`
		} `json:"upstreams"`
	}
	obsGetJSON(t, p.Admin+"/affinity/", &status)

	for g, ts := range groups {
		found := false
		for _, pl := range lookup.Policies {
			// The handler's config path names where it sits: a named
			// route or the error routes (handle and route are subroutes).
			where := g == "handle" || g == "route" || strings.Contains(pl.Handler, "/"+g+"/")
			if where && pl.Error == "" && pl.Decision == "ring" && pl.Upstream != nil &&
				(*pl.Upstream == ts[0].dial || *pl.Upstream == ts[1].dial) {
				found = true
			}
		}
		if !found {
			t.Errorf("%s: no lookup answer for its proxy: %+v", g, lookup.Policies)
		}
		for _, pt := range ts {
			ok := false
			for _, u := range status.Upstreams {
				ok = ok || (u.Upstream == pt.dial && u.Configured && u.Share != nil && *u.Share > 0)
			}
			if !ok {
				t.Errorf("%s: %s is not on the status page as configured with a share: %+v", g, pt.dial, status.Upstreams)
			}
		}
	}
	obsEventually(t, "every proxy's probe runs", 10*time.Second, func() (bool, string) {
		var idle []string
		for g, ts := range groups {
			for _, pt := range ts {
				if pt.probes.Load() == 0 {
					idle = append(idle, g+" "+pt.dial)
				}
			}
		}
		return len(idle) == 0, fmt.Sprint("not probed: ", idle)
	})
}
