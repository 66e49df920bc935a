package tests

import (
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// TestPinCookieCaddyfile: the pin_cookie block and the secret list adapt
// to the JSON the README documents, and every mistake in them makes
// `caddy adapt` fail naming the file and the line at fault.
func TestPinCookieCaddyfile(t *testing.T) {
	needCaddy(t)

	t.Run("good config adapts", func(t *testing.T) {
		text, _ := badSite(
			"pin_cookie affinity_pin {",
			"domain example.com",
			"path /",
			"same_site none",
			"secure always",
			"max_age 12h",
			"partitioned",
			"}",
			"secret {env.PIN_SECRET} {env.OLD_PIN_SECRET}",
		)
		file := filepath.Join(t.TempDir(), "Caddyfile")
		stdout, stderr, err := adapt(t, file, text)
		if err != nil {
			t.Fatalf("caddy adapt failed: %v\n%s\n%s", err, stderr, text)
		}
		for _, want := range []string{
			`"pin_cookie":"affinity_pin"`,
			// Caddy sorts the keys.
			`"pin_cookie_attributes":{"domain":"example.com","max_age":43200000000000,"partitioned":true,"path":"/","same_site":"none","secure":"always"}`,
			`"previous_secrets":["{env.OLD_PIN_SECRET}"]`,
			`"secret":"{env.PIN_SECRET}"`,
		} {
			if !strings.Contains(stdout, want) {
				t.Errorf("the adapted JSON lacks %s:\n%s", want, truncate(stdout, 3000))
			}
		}
	})

	for _, tc := range []struct {
		name  string
		lines []string
		words []string
	}{
		{"same_site none with secure auto", []string{"pin_cookie {", "same_site none", "!secure auto", "}"}, []string{"secure always"}},
		{"partitioned with secure auto", []string{"pin_cookie p {", "!secure auto", "partitioned", "}"}, []string{"partitioned", "secure"}},
		{"zero max_age", []string{"pin_cookie {", "!max_age 0s", "}"}, []string{"max_age", "positive"}},
		{"negative max_age", []string{"pin_cookie {", "path /", "!max_age -1h", "}"}, []string{"max_age", "-1h"}},
		{"path not absolute", []string{"pin_cookie {", "!path app", "}"}, []string{"path", "/"}},
		{"path with a semicolon", []string{"pin_cookie {", "!path /a;b", "}"}, []string{"path"}},
		{"domain with a space", []string{"pin_cookie {", `!domain "example.com x"`, "}"}, []string{"domain"}},
		{"unknown same_site", []string{"pin_cookie {", "!same_site loose", "}"}, []string{"same_site", "loose"}},
		{"unknown attribute", []string{"pin_cookie {", "!expires tomorrow", "}"}, []string{"expires"}},
		{"secret twice in the list", []string{"!secret a b a"}, []string{"secret", "twice"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			text, line := badSite(tc.lines...)
			file := filepath.Join(t.TempDir(), "Caddyfile")
			_, stderr, err := adapt(t, file, text)
			if err == nil {
				t.Fatalf("caddy adapt accepted line %d %q\n%s", line, strings.Split(text, "\n")[line-1], text)
			}
			where := regexp.MustCompile(regexp.QuoteMeta(file) + ":" + strconv.Itoa(line) + `(\D|$)`)
			if !where.MatchString(stderr) {
				t.Errorf("stderr does not name %s:%d (%q):\n%s", file, line, strings.Split(text, "\n")[line-1], stderr)
			}
			for _, w := range tc.words {
				if !strings.Contains(strings.ToLower(stderr), strings.ToLower(w)) {
					t.Errorf("stderr does not say %q:\n%s", w, stderr)
				}
			}
			t.Logf("%s", strings.TrimSpace(stderr))
		})
	}
}

// TestPinCookieSetCookieLines asks the real binary for a new session's
// pin under each setting and checks the Set-Cookie line; a max_age
// shorter than a live session's pin can get is logged as a warning.
func TestPinCookieSetCookieLines(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 2)
	cfg := func(policy string) proxyConfig {
		return proxyConfig{Upstreams: addrsOf(bs), Policy: "session_ttl 20m\n" + policy}
	}
	p := startCaddy(t, "cookies", cfg("pin_cookie affinity_pin {\nmax_age 1m\n}"))
	const warning = "pin_cookie max_age is shorter than session_ttl + session_ttl/4, the oldest a live session's pin can get: sessions idle longer than max_age lose their pin"
	if !strings.Contains(p.out.String(), `"msg":"`+warning+`"`) {
		t.Errorf("no warning for max_age 1m with session_ttl 20m; output:\n%s", tailLines(p.out.String(), 20))
	}
	for _, tc := range []struct{ policy, want string }{
		{"pin_cookie affinity_pin {\nmax_age 1m\n}", "affinity_pin=V; Path=/; Max-Age=60; HttpOnly; SameSite=Lax"},
		{"", "caddy_affinity=V; Path=/; HttpOnly; SameSite=Lax"},
		{"pin_cookie {\ndomain 127.0.0.1\npath /\nsame_site strict\nmax_age 30m\n}", "caddy_affinity=V; Path=/; Domain=127.0.0.1; Max-Age=1800; HttpOnly; SameSite=Strict"},
		{"pin_cookie {\nsame_site none\n}", "caddy_affinity=V; Path=/; HttpOnly; Secure; SameSite=None"},
		{"pin_cookie {\nsame_site none\npartitioned\n}", "caddy_affinity=V; Path=/; HttpOnly; Secure; SameSite=None; Partitioned"},
		{"pin_cookie {\nsecure always\n}", "caddy_affinity=V; Path=/; HttpOnly; Secure; SameSite=Lax"},
	} {
		p.reload(t, cfg(tc.policy))
		c := newClient(t)
		r := c.visit(p.URL)
		if r.failed() {
			t.Fatalf("visit: %s", r)
		}
		var got string
		for _, sc := range r.Header.Values("Set-Cookie") {
			if strings.HasPrefix(sc, "affinity_pin=") || strings.HasPrefix(sc, "caddy_affinity=") {
				name, rest, _ := strings.Cut(sc, "=")
				_, attrs, _ := strings.Cut(rest, ";")
				got = name + "=V;" + attrs
			}
		}
		t.Logf("%q: Set-Cookie: %s", tc.policy, got)
		if got != tc.want {
			t.Errorf("%q: Set-Cookie %q, want %q", tc.policy, got, tc.want)
		}
	}
}
