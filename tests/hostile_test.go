package tests

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net/http"
	"strings"
	"testing"
)

func randomBase64(n int, enc *base64.Encoding) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return enc.EncodeToString(b)
}

// flipByte decodes a pin (base64url, no padding), flips one bit of byte
// i, and encodes it again.
func flipByte(t *testing.T, pin string, i int) string {
	t.Helper()
	raw, err := base64.RawURLEncoding.DecodeString(pin)
	if err != nil || i >= len(raw) {
		t.Fatalf("the pin %q is not the documented base64url token (%v, %d bytes)", pin, err, len(raw))
	}
	raw[i] ^= 0x01
	return base64.RawURLEncoding.EncodeToString(raw)
}

// TestHostilePinCookies: forged, malformed and oversized pin cookies, app
// cookies and X-Forwarded-For headers are ignored: every response is a
// 200 from a worker, never a 5xx, and an established session goes on
// (the session table knows its key).
func TestHostilePinCookies(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddy(t, "hostile", proxyConfig{
		Upstreams: addrsOf(bs),
		Policy:    "key cookie " + appCookie + "\nkey client_ip",
		// X-Forwarded-For from loopback is believed, so odd values reach
		// Caddy's client IP parsing and the client_ip key.
		Global: "servers {\n\ttrusted_proxies static 127.0.0.0/8\n}",
	})
	all := newStats() // every request of this test

	// establish returns a client with a session (2 visits) and its pin.
	establish := func(t *testing.T) (*client, string) {
		t.Helper()
		c := newClient(t)
		for range 2 {
			if ev := all.record(c, c.visit(p.URL)); ev != evOK && ev != evNew {
				t.Fatalf("establishing a session: %s", c)
			}
		}
		pin, ok := c.cookie(p.URL, pinCookie)
		if !ok {
			t.Fatalf("no %s cookie after two visits: %s", pinCookie, c)
		}
		return c, pin
	}
	appSession := func(t *testing.T, c *client) string {
		t.Helper()
		v, ok := c.cookie(p.URL, appCookie)
		if !ok {
			t.Fatalf("no %s cookie: %s", appCookie, c)
		}
		return v
	}
	// expectGoesOn: a hostile request, then a normal one: both 200, on the
	// same worker, with the visit count going on.
	expectGoesOn := func(t *testing.T, c *client, what string, r visitResult) {
		t.Helper()
		if ev := all.record(c, r); ev != evOK {
			t.Errorf("%s: %s (%s), want the session to go on: %s", what, ev, r, c)
			return
		}
		if ev := all.record(c, c.visit(p.URL)); ev != evOK {
			t.Errorf("%s, then a normal visit: %s, want the session to go on: %s", what, ev, c)
		}
	}

	_, samplePin := establish(t)
	t.Logf("a genuine pin: %q (%d chars)", samplePin, len(samplePin))
	if len(samplePin) != 40 {
		t.Fatalf("the pin %q is not the documented 40-character pin (token, time, tag)", samplePin)
	}

	// Each bad pin is made from the client's own genuine pin (own), so that
	// one the policy still accepts (the quoted form) routes the session
	// to its own worker all the same.
	pins := []struct {
		name  string
		value func(t *testing.T, own string) string
	}{
		{"random base64url, pin length", func(*testing.T, string) string { return randomBase64(30, base64.RawURLEncoding) }},
		{"random base64url, v1 pin length", func(*testing.T, string) string { return randomBase64(18, base64.RawURLEncoding) }},
		{"random base64, long", func(*testing.T, string) string { return randomBase64(96, base64.StdEncoding) }},
		// The README's token: 18 bytes, a 6-byte id then a 12-byte MAC.
		{"wrong MAC", func(t *testing.T, own string) string { return flipByte(t, own, 17) }},
		{"wrong id", func(t *testing.T, own string) string { return flipByte(t, own, 0) }},
		// The time and tag after it (bytes 18..29) matter only on a
		// worker that takes no new sessions; here the session goes on.
		{"wrong time", func(t *testing.T, own string) string { return flipByte(t, own, 21) }},
		{"wrong tag", func(t *testing.T, own string) string { return flipByte(t, own, 29) }},
		{"another pin's id, own MAC", func(t *testing.T, own string) string { return samplePin[:8] + own[8:] }},
		{"empty", func(*testing.T, string) string { return "" }},
		{"8 KiB", func(*testing.T, string) string { return strings.Repeat("A", 8<<10) }},
		{"8 KiB of base64url", func(*testing.T, string) string { return randomBase64(6<<10, base64.RawURLEncoding) }},
		{"invalid UTF-8", func(*testing.T, string) string { return strings.Repeat("\xff\xfe", 20) }},
		{"invalid UTF-8, mixed", func(_ *testing.T, own string) string { return own[:10] + "\xc3\x28\xa0\xa1" + own[14:] }},
		{"quoted", func(_ *testing.T, own string) string { return `"` + own + `"` }},
		{"padding", func(_ *testing.T, own string) string { return own + "==" }},
		{"standard base64 alphabet", func(_ *testing.T, own string) string {
			return strings.NewReplacer("-", "+", "_", "/").Replace(own) + "+/"
		}},
		{"percent-encoded", func(*testing.T, string) string { return strings.Repeat("%41", 40) }},
	}

	for _, tc := range pins {
		t.Run("pin/"+tc.name, func(t *testing.T) {
			// An established session with its real app cookie and a bad pin.
			c, own := establish(t)
			for i := range 3 {
				hdr := appCookie + "=" + appSession(t, c) + "; " + pinCookie + "=" + tc.value(t, own)
				expectGoesOn(t, c, fmt.Sprintf("bad pin, request %d", i+1), c.visitWith(p.URL, hdr, nil))
			}
			// A new browser that holds the bad pin and sends it until the
			// proxy replaces it: a new session, which then goes on.
			f := newClient(t)
			bad := tc.value(t, own)
			for i := range 3 {
				hdr := pinCookie + "=" + bad
				if v, ok := f.cookie(p.URL, pinCookie); ok {
					hdr = pinCookie + "=" + v
				}
				if v, ok := f.cookie(p.URL, appCookie); ok {
					hdr = appCookie + "=" + v + "; " + hdr
				}
				want := evOK
				if i == 0 {
					want = evNew
				}
				if ev := all.record(f, f.visitWith(p.URL, hdr, nil)); ev != want {
					t.Errorf("new browser holding a bad pin, visit %d: %s, want %s: %s", i+1, ev, want, f)
				}
			}
		})
	}

	t.Run("pin/300 cookies in one header", func(t *testing.T) {
		c, pin := establish(t)
		sess := appSession(t, c)
		var parts []string
		for i := range 150 {
			parts = append(parts, fmt.Sprintf("junk%d=%s", i, randomBase64(12, base64.RawURLEncoding)))
			parts = append(parts, pinCookie+"="+randomBase64(18, base64.RawURLEncoding))
		}
		// The genuine cookies last, among 300 others.
		hdr := strings.Join(parts, "; ") + "; " + appCookie + "=" + sess + "; " + pinCookie + "=" + pin
		expectGoesOn(t, c, "300 cookies", c.visitWith(p.URL, hdr, nil))
		// The app cookie first, then 300 bad ones.
		hdr = appCookie + "=" + sess + "; " + strings.Join(parts, "; ")
		expectGoesOn(t, c, "app cookie then 300 cookies", c.visitWith(p.URL, hdr, nil))
		// Many pin cookies, genuine first.
		hdr = appCookie + "=" + sess + "; " + pinCookie + "=" + pin + "; " + strings.Join(parts, "; ")
		expectGoesOn(t, c, "genuine pin then 300 cookies", c.visitWith(p.URL, hdr, nil))
	})

	t.Run("pin/several Cookie headers", func(t *testing.T) {
		c, pin := establish(t)
		sess := appSession(t, c)
		hdr := http.Header{"Cookie": {
			pinCookie + "=" + randomBase64(18, base64.RawURLEncoding),
			appCookie + "=" + sess,
			pinCookie + "=" + pin,
		}}
		expectGoesOn(t, c, "three Cookie header lines", c.visitWith(p.URL, "", hdr))
	})

	// A genuine pin of another upstream is not an attack: it routes the
	// request to the upstream it names (the client could have been placed
	// there), and the answer is a 200 from that worker.
	t.Run("pin/copied from another upstream", func(t *testing.T) {
		var first *client
		for range 40 {
			c, pin := establish(t)
			if first == nil {
				first = c
				continue
			}
			if c.worker == first.worker {
				continue
			}
			hdr := appCookie + "=" + appSession(t, first) + "; " + pinCookie + "=" + pin
			r := first.visitWith(p.URL, hdr, nil)
			all.record(first, r)
			if r.failed() || r.Worker != c.worker {
				t.Errorf("session of %s with the pin of a session on %s: got %s, want a 200 from %s", first.trail[0], c.worker, r, c.worker)
			}
			return
		}
		t.Skip("40 sessions all landed on one worker")
	})

	// Garbage in the app's own cookie: the pin still routes the request
	// to the session's worker, which answers 200 (it starts a new
	// session: the cookie named none it knows).
	appValues := []struct{ name, value string }{
		{"random", randomBase64(24, base64.RawURLEncoding)},
		{"empty", ""},
		{"8 KiB", strings.Repeat("x", 8<<10)},
		{"invalid UTF-8", strings.Repeat("\xff", 40)},
		{"quotes and equals", `"a=b=c"`},
		{"spaces inside", "a b c"},
	}
	for _, tc := range appValues {
		t.Run("app cookie/"+tc.name, func(t *testing.T) {
			c, pin := establish(t)
			w := c.worker
			r := c.visitWith(p.URL, appCookie+"="+tc.value+"; "+pinCookie+"="+pin, nil)
			all.record(c, r)
			if r.failed() {
				t.Fatalf("garbage app cookie: %s, want 200", r)
			}
			if r.Worker != w {
				t.Errorf("garbage app cookie with a genuine pin for %s went to %s", w, r.Worker)
			}
			// From here on the browser has the app's new session.
			for range 2 {
				if ev := all.record(c, c.visit(p.URL)); ev != evOK {
					t.Errorf("after the garbage app cookie: %s: %s", ev, c)
				}
			}
		})
	}

	xffs := []struct{ name, value string }{
		{"garbage", "garbage"},
		{"unknown", "unknown"},
		{"bad IPv4", "999.999.999.999"},
		{"empty elements", " , ,, "},
		{"host:port", "192.0.2.7:4711"},
		{"bracketed IPv6 with port", "[2001:db8::1]:443"},
		{"IPv6 zone", "fe80::1%eth0"},
		{"IPv4-mapped IPv6", "::ffff:192.0.2.9"},
		{"invalid UTF-8", "\xff\xfe\xfd"},
		// Go's HTTP server in Caddy answers 431 itself, before any handler,
		// somewhere past ~1500 entries: stay below that.
		{"1000 entries", strings.TrimSuffix(strings.Repeat("192.0.2.1, ", 1000), ", ")},
		{"8 KiB one token", strings.Repeat("9", 8<<10)},
	}
	for _, tc := range xffs {
		t.Run("x-forwarded-for/"+tc.name, func(t *testing.T) {
			hdr := http.Header{"X-Forwarded-For": {tc.value}}
			// An established session.
			c, _ := establish(t)
			cookies := appCookie + "=" + appSession(t, c)
			if pin, ok := c.cookie(p.URL, pinCookie); ok {
				cookies += "; " + pinCookie + "=" + pin
			}
			expectGoesOn(t, c, "odd X-Forwarded-For", c.visitWith(p.URL, cookies, hdr))
			// A new client: keyed by client IP on its first request.
			f := newClient(t)
			r := f.visitWith(p.URL, "", hdr)
			if ev := all.record(f, r); ev != evNew {
				t.Errorf("new client with X-Forwarded-For %q: %s (%s)", truncate(tc.value, 40), ev, r)
				return
			}
			for range 2 {
				if ev := all.record(f, f.visit(p.URL)); ev != evOK {
					t.Errorf("new client after an odd X-Forwarded-For: %s: %s", ev, f)
				}
			}
		})
	}

	t.Logf("all requests of the test: %s", all)
	if all.status5xx != 0 {
		t.Errorf("%d responses were 5xx; samples:%s", all.status5xx, all.samplesText())
	}
}
