package keys

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"golang.org/x/net/http/httpguts"

	"github.com/caddy-affinity/caddy-affinity/hashring"
)

// cookieRequest returns a request carrying the cookies.
func cookieRequest(cookies ...string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "http://example.com/", nil)
	if len(cookies) > 0 {
		r.Header.Set("Cookie", strings.Join(cookies, "; "))
	}
	return r
}

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
		got, ok := CookieValue(h, tc.name)
		if got != tc.want || ok != tc.ok {
			t.Errorf("CookieValue(%q, %q) = %q, %v; want %q, %v", tc.headers, tc.name, got, ok, tc.want, tc.ok)
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
	k := Source{From: "client_ip", IPv4Bits: 24}
	if err := k.Provision(); err != nil {
		t.Fatal(err)
	}
	hashOf := func(remote string) (uint64, bool) {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.RemoteAddr = remote
		return k.Hash(r)
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
		v, ok := CookieValue(h, name)
		if ok && (v == "" || !strings.Contains(header, v)) {
			t.Fatalf("CookieValue(%q, %q) = %q, not part of the header", header, name, v)
		}
		// It reads what net/http reads (below its limit on the number of
		// cookies in a request).
		r := &http.Request{Header: h}
		if httpguts.ValidHeaderFieldName(name) && strings.Count(header, ";") < 3000 {
			c, err := r.Cookie(name)
			found := err == nil && c.Value != ""
			if found != ok || (ok && v != c.Value) {
				t.Fatalf("CookieValue(%q, %q) = %q, %v; net/http reads %v (%v)", header, name, v, ok, c, err)
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
	keys := []Source{{From: "cookie", Name: "sid"}, {From: "header", Name: "X-Session"}, {From: "query", Name: "s"}, {From: "client_ip", IPv4Bits: 16, IPv6Bits: 48}}
	for i := range keys {
		if err := keys[i].Provision(); err != nil {
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
			_, ok := k.Hash(r)
			if k.From == "header" && ok != (header != "") {
				t.Fatalf("header key found=%v for %q", ok, header)
			}
			if k.From == "cookie" && ok && !strings.Contains(cookie, "sid=") {
				t.Fatalf("cookie key found in %q", cookie)
			}
		}
	})
}

// The platforms' session cookies are read in one pass over the Cookie
// header, classic ASP's by its prefix.
func TestPlatformCookieValue(t *testing.T) {
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
	for _, kk := range kinds {
		k := Source{From: kk.name}
		if kk.named {
			k.Name = "JSESSIONID"
		}
		if err := k.Provision(); err != nil {
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
		h, ok := k.Hash(r)
		if !ok {
			t.Fatalf("%s: a request carrying the value has no key", kk.name)
		}
		if kk.read != nil && h != k.HashValue(value) {
			t.Errorf("%s: the request's key %x is not the learned one %x", kk.name, h, k.HashValue(value))
		}
		if k.ReadsCookie("JSESSIONID") != (kk.name == "cookie" || kk.name == "platform_cookies") {
			t.Errorf("%s: readsCookie says %v for JSESSIONID", kk.name, k.ReadsCookie("JSESSIONID"))
		}
		if k.Learnable() && kk.seed != seedSessionID {
			t.Errorf("%s: learnable with seed %d: an id learned from a cookie would not be the key read from the path", kk.name, kk.seed)
		}
	}
}

// Read finds the keys in the sources' order, each source its own key.
func TestReadInOrder(t *testing.T) {
	sources := []Source{{From: "cookie", Name: "sid"}, {From: "header", Name: "x-session"}, {From: "query", Name: "s"}}
	for i := range sources {
		if err := sources[i].Provision(); err != nil {
			t.Fatal(err)
		}
	}
	var buf [Max]uint64
	r := httptest.NewRequest(http.MethodGet, "/?s=q", nil)
	r.Header.Set("X-Session", "q")
	r.Header.Set("Cookie", "sid=q")
	hashes, _ := Read(r, sources, false, &buf)
	if len(hashes) != 3 {
		t.Fatalf("found %d keys, want 3", len(hashes))
	}
	if hashes[0] == hashes[1] || hashes[1] == hashes[2] || hashes[0] == hashes[2] {
		t.Error("the same value from different sources is the same key")
	}
	r.Header.Del("Cookie")
	var buf2 [Max]uint64
	if k, _ := Read(r, sources, false, &buf2); len(k) != 2 || k[0] != hashes[1] {
		t.Error("keys not in configured order")
	}
	r = httptest.NewRequest(http.MethodGet, "/", nil)
	if k, _ := Read(r, sources, false, &buf); len(k) != 0 {
		t.Error("key found in a request without any")
	}
}
