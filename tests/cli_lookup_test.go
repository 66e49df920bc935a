package tests

import (
	"strings"
	"testing"
)

// TestCLILookupAndMistakes: `caddy affinity lookup` explains where a
// session goes, from its key or from a whole Cookie header; mistakes on
// the command line exit non-zero with a one-line hint; `drain --wait`
// piped prints no progress line.
func TestCLILookupAndMistakes(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddy(t, "cli-lookup", proxyConfig{Upstreams: addrsOf(bs), Policy: "key cookie " + appCookie})
	admin := strings.TrimPrefix(p.Admin, "http://")
	clients := newClients(t, 6)
	expectClean(t, "visits", visitAll(clients, p.URL, 2, 6))
	c := clients[0]
	sid, ok := c.cookie(p.URL, appCookie)
	pin, okPin := c.cookie(p.URL, pinCookie)
	if !ok || !okPin {
		t.Fatalf("client has no %s or %s cookie", appCookie, pinCookie)
	}
	want := backendNamed(bs, c.worker).addr

	// "--": one base64url id in 64 starts with '-'.
	code, out, _ := runCLI(t, "affinity", "lookup", "--address", admin, "--", sid)
	if code != 0 || !strings.Contains(out, "-> "+want+"  (") || !strings.Contains(out, "cookie "+appCookie) {
		t.Errorf("lookup of the app cookie: exit %d, want the session on %s:\n%s", code, want, out)
	}
	header := "Cookie: " + appCookie + "=" + sid + "; other=1; " + pinCookie + "=" + pin
	code, out, _ = runCLI(t, "affinity", "lookup", "--address", admin, header)
	if code != 0 || strings.Count(out, "-> "+want+"  (") != 2 || strings.Index(out, pinCookie) > strings.Index(out, "cookie "+appCookie) {
		t.Errorf("lookup of a Cookie header: exit %d, want the pin first, then the app cookie, both on %s:\n%s", code, want, out)
	}

	for _, args := range [][]string{
		{"affinity", "drian", "9001"},
		{"affinity", "status", "--bogus"},
		{"affinity", "lookup"},
		{"affinity", "lookup", "--address", admin, "-nciDKG9N4Ve_YZkj37gG"},
	} {
		code, out, errOut := runCLI(t, args...)
		lines := strings.Split(strings.TrimSpace(errOut), "\n")
		if code == 0 || out != "" || len(lines) != 1 || !strings.Contains(lines[0], "--help") {
			t.Errorf("caddy %s: exit %d, stdout %q, stderr %q: want a non-zero exit and one line naming --help", strings.Join(args, " "), code, out, errOut)
		}
		if strings.HasPrefix(args[len(args)-1], "-n") && !strings.Contains(errOut, "goes after '--'") {
			t.Errorf("caddy %s: stderr %q: want the hint to pass a key that starts with '-' after '--'", strings.Join(args, " "), errOut)
		}
	}

	// A drain that cannot finish in time, piped: its lines, no progress.
	code, out, _ = runCLI(t, "affinity", "drain", "--wait", "2s", "--address", admin, want)
	if code == 0 || strings.ContainsAny(out, "\r\033") || !strings.Contains(out, "is now draining") {
		t.Errorf("drain --wait piped: exit %d, output %q: want exit 1 and no progress line", code, out)
	}
}
