package tests

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// adapt writes text to file, runs `caddy adapt` on it, and returns its
// stdout, stderr and exit error.
func adapt(t *testing.T, file, text string) (stdout, stderr string, err error) {
	t.Helper()
	if err := os.WriteFile(file, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, caddyBin, "adapt", "--config", file, "--adapter", "caddyfile")
	cmd.Env = isolatedEnv(filepath.Dir(file))
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("caddy adapt did not finish in 60s")
	}
	return out.String(), errOut.String(), err
}

// badSite is a Caddyfile whose policy block holds the given lines; the
// line marked with a leading "!" is the bad one. It returns the text and
// the 1-based line number of the bad line.
func badSite(policyLines ...string) (string, int) {
	var b strings.Builder
	b.WriteString("{\n\tadmin off\n\tauto_https off\n\tpersist_config off\n}\n\n")
	b.WriteString("http://127.0.0.1:8080 {\n")
	b.WriteString("\treverse_proxy 127.0.0.1:9001 127.0.0.1:9002 127.0.0.1:9003 {\n")
	b.WriteString("\t\tlb_policy affinity {\n")
	bad := 0
	for _, l := range policyLines {
		if strings.HasPrefix(l, "!") {
			l = l[1:]
			bad = strings.Count(b.String(), "\n") + 1
		}
		b.WriteString("\t\t\t" + l + "\n")
	}
	b.WriteString("\t\t}\n\t\tlb_retries 2\n\t\thealth_uri /healthz\n\t}\n}\n")
	return b.String(), bad
}

// TestBadCaddyfile: every mistake in the policy block makes `caddy adapt`
// fail, and the message names the file and line and the problem.
func TestBadCaddyfile(t *testing.T) {
	needCaddy(t)

	// The control: every option used correctly adapts.
	t.Run("good config adapts", func(t *testing.T) {
		text, _ := badSite(
			"key cookie "+appCookie,
			"key header X-Session-Token",
			"key query sid",
			"key client_ip 24 56",
			"pin_cookie my_pin",
			"secret s3cr3t",
			"session_ttl 30m",
			"max_sessions 5000",
			"weights 2 1 1",
		)
		file := filepath.Join(t.TempDir(), "Caddyfile")
		stdout, stderr, err := adapt(t, file, text)
		if err != nil {
			t.Fatalf("caddy adapt of a good config failed: %v\nstderr:\n%s\nCaddyfile:\n%s", err, stderr, text)
		}
		if !strings.Contains(stdout, `"affinity"`) || !strings.Contains(stdout, `"my_pin"`) {
			t.Errorf("the adapted JSON does not hold the affinity policy:\n%s", truncate(stdout, 2000))
		}
	})

	cases := []struct {
		name  string
		lines []string
		words []string // each must appear in stderr (case-insensitive)
	}{
		{"unknown subdirective", []string{"key cookie " + appCookie, "!stickiness forever"}, []string{"stickiness"}},
		{"key with unknown source", []string{"!key jwt token"}, []string{"jwt"}},
		{"key without source", []string{"!key"}, []string{"key"}},
		{"key cookie without name", []string{"!key cookie", "secret x"}, []string{"cookie", "name"}},
		{"key header without name", []string{"!key header"}, []string{"header", "name"}},
		{"key cookie with two names", []string{"!key cookie a b"}, []string{"cookie"}},
		{"key client_ip bad prefix", []string{"!key client_ip 33"}, []string{"client_ip", "33"}},
		{"bad duration for session_ttl", []string{"key cookie " + appCookie, "!session_ttl fortnight"}, []string{"session_ttl", "fortnight"}},
		{"session_ttl without value", []string{"!session_ttl"}, []string{"session_ttl"}},
		{"negative max_sessions", []string{"key cookie " + appCookie, "!max_sessions -5"}, []string{"max_sessions", "-5"}},
		{"max_sessions not a number", []string{"!max_sessions lots"}, []string{"max_sessions", "lots"}},
		{"negative weight", []string{"!weights 1 -1 1"}, []string{"weights", "-1"}},
		{"weight not a number", []string{"!weights 1 heavy 1"}, []string{"weights", "heavy"}},
		{"pin_cookie with two args", []string{"key cookie " + appCookie, "!pin_cookie a b"}, []string{"pin_cookie"}},
		{"pin_cookie invalid name", []string{"!pin_cookie bad;name"}, []string{"pin_cookie"}},
		{"secret without value", []string{"!secret"}, []string{"secret"}},
		{"option given twice", []string{"session_ttl 10m", "!session_ttl 20m"}, []string{"session_ttl"}},
		{"store redis sentinel without sentinels", []string{"key cookie " + appCookie, "store redis {", "!sentinel mymaster", "}"}, []string{"sentinel", "mymaster"}},
		{"store redis cluster node without port", []string{"key cookie " + appCookie, "store redis {", "!cluster 10.0.0.1", "}"}, []string{"cluster", "10.0.0.1"}},
		{"store redis db on a cluster", []string{"key cookie " + appCookie, "!store redis {", "cluster 10.0.0.1:6379", "db 2", "}"}, []string{"database 0"}},
		{"store redis address and cluster", []string{"key cookie " + appCookie, "!store redis 10.0.0.1:6379 {", "cluster 10.0.0.2:6379", "}"}, []string{"not several"}},
		// Rules of the config (Validate), reported at the line that breaks them.
		{"pin cookie is a default key's cookie", []string{"secret s3cr3t", "!pin_cookie JSESSIONID"}, []string{"pin_cookie JSESSIONID", "platform_cookies"}},
		{"pin cookie is a key's cookie", []string{"!key cookie sid", "pin_cookie sid"}, []string{"key cookie sid", "pin cookie sid"}},
		{"key none with the pin cookie off", []string{"key none", "!pin_cookie off"}, []string{"pin_cookie off", "key none"}},
		{"max_sessions beyond its bound", []string{"key cookie " + appCookie, "!max_sessions 99999999999999"}, []string{"max_sessions", "99999999999999"}},
		{"balance_factor beyond its bound", []string{"key cookie " + appCookie, "!balance_factor 1e308", "session_ttl 10m"}, []string{"balance_factor", "at most 100"}},
		{"session_ttl too long", []string{"!session_ttl 400d"}, []string{"session_ttl", "8760h"}},
		{"tomcat_route without a session id key", []string{"key header X-Session", "!tomcat_route n1 127.0.0.1:9001"}, []string{"tomcat_route", "key cookie"}},
		{"secure auto with same_site none", []string{"pin_cookie {", "\tsame_site none", "!\tsecure auto", "}"}, []string{"secure always"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			text, line := badSite(tc.lines...)
			if line == 0 {
				t.Fatal("test case marks no bad line")
			}
			file := filepath.Join(t.TempDir(), "Caddyfile")
			stdout, stderr, err := adapt(t, file, text)
			var exit *exec.ExitError
			if err == nil {
				t.Fatalf("caddy adapt accepted the bad line %d %q (exit 0)\nstdout:\n%s\nCaddyfile:\n%s",
					line, strings.Split(text, "\n")[line-1], truncate(stdout, 1500), text)
			}
			if !errors.As(err, &exit) {
				t.Fatalf("caddy adapt: %v", err)
			}
			// The file and line, e.g. "/tmp/.../Caddyfile:11", not followed by
			// another digit.
			where := regexp.MustCompile(regexp.QuoteMeta(file) + ":" + strconv.Itoa(line) + `(\D|$)`)
			if !where.MatchString(stderr) {
				t.Errorf("stderr does not name %s:%d (the bad line %q):\n%s", file, line, strings.Split(text, "\n")[line-1], stderr)
			}
			low := strings.ToLower(stderr)
			for _, w := range tc.words {
				if !strings.Contains(low, strings.ToLower(w)) {
					t.Errorf("stderr does not name the problem (%q):\n%s", w, stderr)
				}
			}
			t.Logf("%s", strings.TrimSpace(stderr))
		})
	}
}

// TestHoldNeedsTryDuration: hold waits for its upstream by Caddy's
// retries, so a reverse_proxy without lb_try_duration cannot hold. The
// policy's parser sees only its own block, so the check runs when the
// config loads: `caddy validate` fails with the fix, naming the
// reverse_proxy by its upstreams (the Caddyfile's lines are gone by
// then), and passes once lb_try_duration is there.
func TestHoldNeedsTryDuration(t *testing.T) {
	needCaddy(t)
	text, _ := badSite("key cookie "+appCookie, "hold 10s")
	dir := t.TempDir()
	file := filepath.Join(dir, "Caddyfile")
	if _, stderr, err := adapt(t, file, text); err != nil {
		t.Fatalf("caddy adapt: %v\n%s", err, stderr)
	}
	validate := func() (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, caddyBin, "validate", "--config", file, "--adapter", "caddyfile")
		cmd.Env = isolatedEnv(dir)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := validate()
	if err == nil || !strings.Contains(out, "lb_try_duration 10s") || !strings.Contains(out, "reverse_proxy (to 127.0.0.1:") {
		t.Fatalf("caddy validate of hold without lb_try_duration: %v, want an error naming the reverse_proxy by its upstreams and giving the fix (lb_try_duration 10s):\n%s", err, out)
	}
	text = strings.Replace(text, "lb_retries 2", "lb_retries 2\n\t\tlb_try_duration 10s", 1)
	if err := os.WriteFile(file, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := validate(); err != nil {
		t.Fatalf("caddy validate with lb_try_duration: %v\n%s", err, out)
	}
}
