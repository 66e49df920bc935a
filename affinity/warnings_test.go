package affinity

import (
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
)

// Pins signed with another secret (another instance with a secret of its
// own) are told once they come at a steady rate, not for one burst; a
// pin of ours with a forged tag, and garbage, are not counted.
func TestForeignPinsAreTold(t *testing.T) {
	pool := testPool(t, 3)
	p := newTestPolicy(t, &Policy{})
	other := newTestPolicy(t, &Policy{Secret: "another-instance-secret-0123"})
	w := httptest.NewRecorder()
	other.Select(pool, newRequest(), w)
	foreign := pinFrom(t, w, DefaultPinCookie)
	w = httptest.NewRecorder()
	p.Select(pool, newRequest(), w)
	ours := pinFrom(t, w, DefaultPinCookie)
	forged := ours[:len(ours)-4] + "AAAA"
	for range 40 {
		p.Select(pool, newRequest(forged), nil)
		p.Select(pool, newRequest(DefaultPinCookie+"=not-a-pin"), nil)
	}
	if p.told.foreign.n != 0 {
		t.Fatalf("forged tags and garbage counted as %d foreign pins", p.told.foreign.n)
	}
	for range foreignPinsTold {
		p.Select(pool, newRequest(foreign), nil)
	}
	now := p.told.foreign.last
	if len(p.Warnings()) != 0 && p.told.foreign.seconds < foreignPinsSeconds {
		t.Fatalf("a burst within %d second(s) was told: %q", p.told.foreign.seconds, p.Warnings())
	}
	for s := uint32(1); s < uint32(foreignPinsSeconds); s++ {
		p.noteForeignPin(now + s)
	}
	ws := p.Warnings()
	if len(ws) != 1 || !strings.Contains(ws[0], "the same `secret`") {
		t.Fatalf("warnings %q, want the foreign pins told with the fix", ws)
	}
	p.noteForeignPin(now + 5)
	if len(p.Warnings()) != 1 {
		t.Fatalf("told twice: %q", p.Warnings())
	}
}

// A key source no request carries is told after keyUnseenAfter requests;
// one that requests carry is not, and then costs nothing more.
func TestUnseenKeyIsTold(t *testing.T) {
	defer func(n uint32) { keyUnseenAfter = n }(keyUnseenAfter)
	keyUnseenAfter = 50
	pool := testPool(t, 3)
	wrong := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "SESSIONID"}, {From: "client_ip"}}})
	right := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}, {From: "client_ip"}}})
	for i := range 60 {
		if i == 10 && len(wrong.Warnings()) != 0 {
			t.Fatalf("told after 10 requests: %q", wrong.Warnings())
		}
		wrong.Select(pool, newRequest("sessionid=x"), nil)
		right.Select(pool, newRequest("sid=x"), nil)
	}
	ws := wrong.Warnings()
	if len(ws) != 1 || !strings.Contains(ws[0], "key cookie SESSIONID appeared in none of the first 50 requests") {
		t.Fatalf("warnings %q", ws)
	}
	if len(right.Warnings()) != 0 || !right.told.keysDone.Load() || right.told.requests.Load() != 0 {
		t.Fatalf("a key that requests carry: warnings %q, done %v after %d requests counted",
			right.Warnings(), right.told.keysDone.Load(), right.told.requests.Load())
	}
}

// More weights than upstreams are told once, however often the pool is
// rebuilt; fewer are the documented default (1 each) and not told.
func TestLongWeightListIsTold(t *testing.T) {
	p := newTestPolicy(t, &Policy{Weights: []int{1, 2, 3, 4}})
	p.Select(testPool(t, 3), newRequest(), nil)
	p.pools.Store(nil)
	p.Select(testPool(t, 3), newRequest(), nil)
	if ws := p.Warnings(); len(ws) != 1 || !strings.Contains(ws[0], "4 weights for 3 upstreams") {
		t.Fatalf("warnings %q", ws)
	}
	short := newTestPolicy(t, &Policy{Weights: []int{1}})
	short.Select(testPool(t, 3), newRequest(), nil)
	if ws := short.Warnings(); len(ws) != 0 {
		t.Fatalf("a short weight list was told: %q", ws)
	}
}
