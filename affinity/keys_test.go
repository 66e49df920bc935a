package affinity

import (
	"github.com/caddy-affinity/caddy-affinity/hashring"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"
)

func TestCookieValue(t *testing.T) {
	for _, tc := range []struct {
		headers []string
		name    string
		want    string
		ok      bool
	}{
		{[]string{"ASP.NET_SessionId=abc"}, "ASP.NET_SessionId", "abc", true},
		{[]string{"a=1; JSESSIONID=ABC.node1; b=2"}, "JSESSIONID", "ABC.node1", true},
		{[]string{"a=1", "sid=two"}, "sid", "two", true},
		{[]string{`sid="quoted"`}, "sid", "quoted", true},
		{[]string{"xsid=no; sidx=no"}, "sid", "", false},
		// As net/http reads it (and so the app): the first valid sid is
		// empty, so there is none.
		{[]string{"sid=; sid=second"}, "sid", "", false},
		{[]string{`sid=a\b; sid=second`}, "sid", "second", true},
		{[]string{"sid=\x01; sid=second"}, "sid", "second", true},
		{[]string{"sid = spaced"}, "sid", " spaced", true},
		{[]string{"sid"}, "sid", "", false},
		{[]string{";;; ;sid=x;"}, "sid", "x", true},
		{[]string{"  sid=spaced  "}, "sid", "spaced", true},
		{[]string{"bad\x00cookie; sid=ok"}, "sid", "ok", true},
		{nil, "sid", "", false},
	} {
		h := http.Header{"Cookie": tc.headers}
		got, ok := cookieValue(h, tc.name)
		if got != tc.want || ok != tc.ok {
			t.Errorf("cookieValue(%q, %q) = %q, %v; want %q, %v", tc.headers, tc.name, got, ok, tc.want, tc.ok)
		}
	}
}

func TestQueryValue(t *testing.T) {
	for _, tc := range []struct {
		q, name, want string
		ok            bool
	}{
		{"sid=1", "sid", "1", true},
		{"a=b&sid=x%20y&sid=2", "sid", "x%20y", true},
		{"xsid=1&sidx=2", "sid", "", false},
		{"sid=&sid=3", "sid", "3", true},
		{"", "sid", "", false},
		{"sid", "sid", "", false},
	} {
		got, ok := queryValue(tc.q, tc.name)
		if got != tc.want || ok != tc.ok {
			t.Errorf("queryValue(%q, %q) = %q, %v; want %q, %v", tc.q, tc.name, got, ok, tc.want, tc.ok)
		}
	}
}

func TestClientIPKeyMasksAndUnmaps(t *testing.T) {
	k := KeySource{From: "client_ip", IPv4Bits: 24}
	if err := k.provision(); err != nil {
		t.Fatal(err)
	}
	hashOf := func(remote string) (uint64, bool) {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.RemoteAddr = remote
		return k.hash(r)
	}
	a, ok1 := hashOf("198.51.100.7:1000")
	b, ok2 := hashOf("198.51.100.200:2000")
	c, ok3 := hashOf("[::ffff:198.51.100.9]:3000")
	d, _ := hashOf("198.51.101.7:1000")
	if !ok1 || !ok2 || !ok3 {
		t.Fatal("no key for a plain client address")
	}
	if a != b || a != c {
		t.Error("addresses in one /24 (one of them IPv4-mapped) are different keys")
	}
	if a == d {
		t.Error("addresses in different /24s are the same key")
	}
	v6a, _ := hashOf("[2001:db8:1:2::1]:1")
	v6b, _ := hashOf("[2001:db8:1:2:ffff::9]:1")
	v6c, _ := hashOf("[2001:db8:1:3::1]:1")
	if v6a != v6b || v6a == v6c {
		t.Error("IPv6 keys do not follow the default /64")
	}
	if _, ok := hashOf("not-an-address"); ok {
		t.Error("garbage remote address gave a key")
	}
}

func TestKeySourcesInOrder(t *testing.T) {
	p := &Policy{Keys: []KeySource{{From: "cookie", Name: "sid"}, {From: "header", Name: "x-session"}, {From: "query", Name: "s"}}}
	for i := range p.Keys {
		if err := p.Keys[i].provision(); err != nil {
			t.Fatal(err)
		}
	}
	var buf [maxKeys]uint64
	r := httptest.NewRequest(http.MethodGet, "/?s=q", nil)
	r.Header.Set("X-Session", "q")
	r.Header.Set("Cookie", "sid=q")
	keys, _ := p.requestKeys(r, &buf, false)
	if len(keys) != 3 {
		t.Fatalf("found %d keys, want 3", len(keys))
	}
	if keys[0] == keys[1] || keys[1] == keys[2] || keys[0] == keys[2] {
		t.Error("the same value from different sources is the same key")
	}
	r.Header.Del("Cookie")
	var buf2 [maxKeys]uint64
	if k, _ := p.requestKeys(r, &buf2, false); len(k) != 2 || k[0] != keys[1] {
		t.Error("keys not in configured order")
	}
	r = httptest.NewRequest(http.MethodGet, "/", nil)
	if k, _ := p.requestKeys(r, &buf, false); len(k) != 0 {
		t.Error("key found in a request without any")
	}
}

// FuzzCookieValue checks the hand-written Cookie parser against garbage:
// it never panics, and what it returns is a part of the header that
// net/http would also find when the header is well formed.
func FuzzCookieValue(f *testing.F) {
	for _, s := range []string{"sid=abc", "a=1; sid=2", `sid="x"`, ";;;", "sid=", "sid==", "\xff=\xfe; sid=\x00", strings.Repeat("a=b; ", 300) + "sid=z"} {
		f.Add(s, "sid")
	}
	f.Fuzz(func(t *testing.T, header, name string) {
		if name == "" {
			return
		}
		h := http.Header{"Cookie": {header}}
		v, ok := cookieValue(h, name)
		if ok && (v == "" || !strings.Contains(header, v)) {
			t.Fatalf("cookieValue(%q, %q) = %q, not part of the header", header, name, v)
		}
		// It reads what net/http reads (below its limit on the number of
		// cookies in a request).
		r := &http.Request{Header: h}
		if validCookieName(name) && strings.Count(header, ";") < 3000 {
			c, err := r.Cookie(name)
			found := err == nil && c.Value != ""
			if found != ok || (ok && v != c.Value) {
				t.Fatalf("cookieValue(%q, %q) = %q, %v; net/http reads %v (%v)", header, name, v, ok, c, err)
			}
		}
	})
}

// FuzzKeyHash runs every key source over arbitrary requests: no panic,
// and a key is found only if the request carries something for it.
func FuzzKeyHash(f *testing.F) {
	f.Add("sid=1", "v", "s=2", "10.0.0.1:5")
	f.Add("", "", "", "[::ffff:1.2.3.4]:80")
	f.Add("\xff", "\x00", "%zz", "garbage")
	f.Add(strings.Repeat("x", 9000), "h", "s=&s", "[fe80::1%eth0]:1")
	keys := []KeySource{{From: "cookie", Name: "sid"}, {From: "header", Name: "X-Session"}, {From: "query", Name: "s"}, {From: "client_ip", IPv4Bits: 16, IPv6Bits: 48}}
	for i := range keys {
		if err := keys[i].provision(); err != nil {
			f.Fatal(err)
		}
	}
	f.Fuzz(func(t *testing.T, cookie, header, query, remote string) {
		r := &http.Request{
			Header:     http.Header{"Cookie": {cookie}, "X-Session": {header}},
			URL:        &url.URL{RawQuery: query},
			RemoteAddr: remote,
		}
		r = r.WithContext(t.Context())
		for _, k := range keys {
			_, ok := k.hash(r)
			if k.From == "header" && ok != (header != "") {
				t.Fatalf("header key found=%v for %q", ok, header)
			}
			if k.From == "cookie" && ok && !strings.Contains(cookie, "sid=") {
				t.Fatalf("cookie key found in %q", cookie)
			}
		}
	})
}

// With no key lines, the platforms' session cookies are the keys: a
// session is counted and found again by its app cookie when the client
// drops the pin; `key none` keeps the pin cookie alone. A request with
// none of those cookies costs one pass over its Cookie header.
func TestPlatformCookiesAreTheDefaultKeys(t *testing.T) {
	for _, tc := range []struct {
		header, want string
	}{
		{"JSESSIONID=ABC.node1", "ABC.node1"},
		{"theme=dark; ASP.NET_SessionId=lit3py55t21z5v55vlm25s55", "lit3py55t21z5v55vlm25s55"},
		{"ASPSESSIONIDQQGGGNCG=KHGLKDEBLOLBDDNGBMGGBHCO", "KHGLKDEBLOLBDDNGBMGGBHCO"},
		{"connect.sid=s%3Aabc.sig; PHPSESSID=p1", "s%3Aabc.sig"},
		{"PHPSESSID=; sessionid=dj", "dj"},
		{"ASPSESSIONID=short; session_id=x; sid=y", ""},
	} {
		got, ok := platformCookieValue(http.Header{"Cookie": {tc.header}})
		if got != tc.want || ok != (tc.want != "") {
			t.Errorf("%q: %q, %v; want %q", tc.header, got, ok, tc.want)
		}
	}
	p := newTestPolicy(t, &Policy{})
	if len(p.Keys) != 1 || p.Keys[0].From != "platform_cookies" || !p.learns {
		t.Fatalf("default keys %+v (learns %v)", p.Keys, p.learns)
	}
	pool := testPool(t, 3)
	w := httptest.NewRecorder()
	home := p.Select(pool, newRequest("JSESSIONID=J1"), w)
	if n := p.table.LiveCount(healthcheck.Get(home.Dial).ID); n != 1 {
		t.Fatalf("the session counts %d, want 1", n)
	}
	for range 10 { // the client dropped the pin: its app cookie keeps it
		if got := p.Select(pool, newRequest("JSESSIONID=J1"), nil); got != home {
			t.Fatalf("without its pin the session went to %s, want %s", got.Dial, home.Dial)
		}
	}
	none := newTestPolicy(t, &Policy{NoDefaultKeys: true})
	if len(none.Keys) != 0 {
		t.Fatalf("key none has keys %+v", none.Keys)
	}
	r := newRequest("JSESSIONID=J1")
	var buf [maxKeys]uint64
	if k, _ := p.requestKeys(r, &buf, false); len(k) != 1 || k[0] != sessionIDHash("J1") {
		t.Fatalf("JSESSIONID=J1 hashes to %v, want the session id's key", k)
	}
	plain := benchRequest("theme=dark; lang=en")
	if a := testing.AllocsPerRun(100, func() { p.requestKeys(plain, &buf, false) }); a != 0 {
		t.Fatalf("reading a request without platform cookies allocated %v", a)
	}
}

// The word-at-a-time check agrees with net/http's byte rule for every
// byte in every position.
func TestValidCookieValueEveryByte(t *testing.T) {
	for b := 0; b < 256; b++ {
		want := b >= 0x20 && b < 0x7f && b != '"' && b != ';' && b != '\\'
		for pos := 0; pos < 11; pos++ {
			v := []byte("abcdefghijk")
			v[pos] = byte(b)
			if got := validCookieValue(string(v)); got != want {
				t.Fatalf("byte %#x at %d: %v, want %v", b, pos, got, want)
			}
		}
	}
}

// sessionIDHash is the key hash of an app's session id, wherever it was
// read (cookie, path parameter, cookieless URL) or learned.
func sessionIDHash(v string) uint64 {
	return hashring.HashStringSeed(v, seedSessionID)
}

// TestKindsHashAsTheyLearn: for every kind that reads a value, a request
// carrying it (the kind's inject) hashes to the key the learner records
// for that value (hashValue, the kind's seed), and the kind's descriptor
// says what it reads: adding a kind is adding its entry.
func TestKindsHashAsTheyLearn(t *testing.T) {
	for _, kk := range keyKinds {
		k := KeySource{From: kk.name}
		if kk.named {
			k.Name = "JSESSIONID"
		}
		if err := k.provision(); err != nil {
			t.Fatalf("%s: %v", kk.name, err)
		}
		r := httptest.NewRequest("GET", "http://example.com/", nil)
		value := "ABCDEF0123456789"
		if kk.name == "client_ip" {
			value = "192.0.2.7"
		}
		if err := kk.inject(&k, r, value); err != nil {
			t.Fatalf("%s: inject: %v", kk.name, err)
		}
		h, ok := k.hash(r)
		if !ok {
			t.Fatalf("%s: a request carrying the value has no key", kk.name)
		}
		if kk.read != nil && h != k.hashValue(value) {
			t.Errorf("%s: the request's key %x is not the learned one %x", kk.name, h, k.hashValue(value))
		}
		if kk.readsCookieNamed(&k, "JSESSIONID") != (kk.name == "cookie" || kk.name == "platform_cookies") {
			t.Errorf("%s: readsCookie says %v for JSESSIONID", kk.name, kk.readsCookieNamed(&k, "JSESSIONID"))
		}
		if kk.learnable() && kk.seed != seedSessionID {
			t.Errorf("%s: learnable with seed %d: an id learned from a cookie would not be the key read from the path", kk.name, kk.seed)
		}
	}
}

// TestAddingAKeyKind adds a kind of key source as its one entry in
// keyKinds and uses it everywhere a kind is used: the Caddyfile, Validate,
// Select, the lookup, and the list the admin API offers.
func TestAddingAKeyKind(t *testing.T) {
	saved := keyKinds
	t.Cleanup(func() { keyKinds = saved })
	keyKinds = append(saved[:len(saved):len(saved)], &keyKind{
		name: "user_agent", seed: 42,
		read: func(_ *KeySource, r *http.Request) (string, bool) {
			ua := r.Header.Get("User-Agent")
			return ua, ua != ""
		},
		inject: func(_ *KeySource, r *http.Request, v string) error { r.Header.Set("User-Agent", v); return nil },
	})
	p, err := parse("affinity {\n key user_agent\n}")
	if err != nil {
		t.Fatalf("the Caddyfile does not take the new kind: %v", err)
	}
	if _, err := parse("affinity {\n key user_agent x\n}"); err == nil || !strings.Contains(err.Error(), "takes no arguments") {
		t.Fatalf("the new kind's arguments are not checked: %v", err)
	}
	p = newTestPolicy(t, p)
	pool := testPool(t, 3)
	r := newRequest()
	r.Header.Set("User-Agent", "curl/8")
	up := p.Select(pool, r, httptest.NewRecorder())
	got := Explain(siteOf(p, pool), "user_agent", "", "curl/8", time.Now())
	if got.Error != "" || got.Upstream == nil || *got.Upstream != up.Dial || got.Decision != DecidedTable {
		t.Fatalf("the lookup by the new kind: %+v, Select chose %s", got, up.Dial)
	}
	listed := false
	for _, k := range KeyKinds() {
		listed = listed || k.Name == "user_agent"
	}
	if !listed {
		t.Fatal("KeyKinds does not list the new kind")
	}
}
