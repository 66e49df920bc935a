package tests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// runCLI runs the built binary with args and returns its exit code,
// stdout and stderr.
func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, caddyBin, args...)
	dir := t.TempDir()
	cmd.Dir = dir
	cmd.Env = isolatedEnv(dir)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if exitErr, ok := errors.AsType[*exec.ExitError](err); ok {
		code = exitErr.ExitCode()
	} else if err != nil {
		t.Fatalf("running caddy %s: %v", strings.Join(args, " "), err)
	}
	t.Logf("$ caddy %s  (exit %d)\n%s%s", strings.Join(args, " "), code, stdout.String(), stderr.String())
	return code, stdout.String(), stderr.String()
}

// TestCLI: `caddy affinity status|drain|maintenance|up` against a running
// Caddy, finding its admin API by --address and by --config.
func TestCLI(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddy(t, "cli", proxyConfig{
		Upstreams: addrsOf(bs),
		Policy:    "key cookie " + appCookie,
	})
	admin := strings.TrimPrefix(p.Admin, "http://")
	expectClean(t, "visits", visitAll(newClients(t, 6), p.URL, 2, 6))
	// Session counts are exact when read; polling tolerates a slow machine.
	obsEventually(t, "sessions counted", 6*time.Second, func() (bool, string) {
		n := int64(0)
		for _, u := range obsUpstreams(t, p) {
			n += u.Sessions
		}
		return n == 6, fmt.Sprint(n)
	})

	// status: a header and a row per upstream.
	code, out, _ := runCLI(t, "affinity", "status", "--address", admin)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || len(lines) != 4 || strings.Join(strings.Fields(lines[0]), " ") != "UPSTREAM STATE HEALTHY SESSIONS REQUESTS DRAINED SINCE" {
		t.Fatalf("status: exit %d, output:\n%s", code, out)
	}
	for _, b := range bs {
		if !strings.Contains(out, b.addr+"  up  ") {
			t.Errorf("status has no row for %s up", b.addr)
		}
	}

	// drain by port, the admin address read from the Caddyfile.
	port := bs[1].addr[strings.LastIndexByte(bs[1].addr, ':')+1:]
	code, out, _ = runCLI(t, "affinity", "drain", "--config", p.File, "--adapter", "caddyfile", port)
	if code != 0 || !strings.Contains(out, bs[1].addr+" is now draining") || !strings.Contains(out, "draining (operator)") {
		t.Fatalf("drain: exit %d, output:\n%s", code, out)
	}
	if u := obsUpstreams(t, p)[bs[1].addr]; u.State != "draining" {
		t.Fatalf("after drain: %+v", u)
	}

	// maintenance, then up, by full address.
	code, out, _ = runCLI(t, "affinity", "maintenance", "--address", admin, bs[2].addr)
	if code != 0 || !strings.Contains(out, "is now in maintenance") || obsUpstreams(t, p)[bs[2].addr].State != "maintenance" {
		t.Fatalf("maintenance: exit %d, output:\n%s", code, out)
	}
	for _, b := range bs[1:] {
		if code, out, _ = runCLI(t, "affinity", "up", "--address", admin, b.addr); code != 0 || !strings.Contains(out, b.addr+" is now up") {
			t.Fatalf("up: exit %d, output:\n%s", code, out)
		}
	}

	// drain --wait: at once for an upstream without sessions; a failure
	// for one whose sessions outlast the wait.
	ups := obsUpstreams(t, p)
	for _, b := range bs {
		start := time.Now()
		code, out, errOut := runCLI(t, "affinity", "drain", "--wait", "1s", "--address", admin, b.addr)
		switch n := ups[b.addr].Sessions; {
		case n == 0 && (code != 0 || !strings.Contains(out, "drained")):
			t.Errorf("drain --wait of idle %s: exit %d:\n%s", b.addr, code, out)
		case n > 0 && (code == 0 || !strings.Contains(errOut, fmt.Sprintf("still holds %d live sessions after 1s", n))):
			t.Errorf("drain --wait of %s with %d sessions: exit %d:\n%s", b.addr, n, code, errOut)
		}
		if time.Since(start) > 8*time.Second {
			t.Errorf("drain --wait 1s took %s", time.Since(start))
		}
		runCLI(t, "affinity", "up", "--address", admin, b.addr)
	}

	// Errors: the API's message and a non-zero exit.
	code, _, errOut := runCLI(t, "affinity", "drain", "--address", admin, "127.0.0.1:1")
	if code == 0 || !strings.Contains(errOut, `unknown upstream "127.0.0.1:1"`) {
		t.Errorf("unknown upstream: exit %d, stderr:\n%s", code, errOut)
	}
	code, _, errOut = runCLI(t, "affinity", "status", "--address", "127.0.0.1:1")
	if code == 0 || !strings.Contains(errOut, "is Caddy running") {
		t.Errorf("no Caddy: exit %d, stderr:\n%s", code, errOut)
	}
	if code, _, _ = runCLI(t, "affinity", "up", "--address", admin); code == 0 {
		t.Errorf("up without an upstream: exit 0")
	}
}
