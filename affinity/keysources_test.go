package affinity

import (
	"net/http/httptest"
	"testing"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
)

// The policy's side of its keys: which it reads, in what order, and what
// they hash to. What each kind reads is tested in package keys.

// sessionIDHash is the key hash of an app's session id, wherever it was
// read (cookie, path parameter, cookieless URL) or learned.
func sessionIDHash(v string) uint64 { return keyHash("cookie", v) }

// keyHash is the key hash of value read by a key of kind from.
func keyHash(from, value string) uint64 {
	k := keys.Source{From: from, Name: "x"}
	if err := k.Provision(); err != nil {
		panic(err)
	}
	return k.HashValue(value)
}

// With no key lines, the platforms' session cookies are the keys: a
// session is counted and found again by its app cookie when the client
// drops the pin; `key none` keeps the pin cookie alone. A request with
// none of those cookies costs one pass over its Cookie header.
func TestPlatformCookiesAreTheDefaultKeys(t *testing.T) {
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
	var buf [keys.Max]uint64
	if k, _ := p.requestKeys(r, &buf, false); len(k) != 1 || k[0] != sessionIDHash("J1") {
		t.Fatalf("JSESSIONID=J1 hashes to %v, want the session id's key", k)
	}
	plain := benchRequest("theme=dark; lang=en")
	if a := testing.AllocsPerRun(100, func() { p.requestKeys(plain, &buf, false) }); a != 0 {
		t.Fatalf("reading a request without platform cookies allocated %v", a)
	}
}
