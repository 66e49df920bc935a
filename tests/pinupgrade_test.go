package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestOldPinWindowIsRecordedOnce: old-format pins (24 or 40 characters
// without a bind) reach a draining worker only during the upgrade
// window, which the first start on a storage records there; a later
// start finds it and does not open it again. A current pin cut to its
// first 24 characters passes for an old one: 5 of 5 such requests
// landed on a draining worker after every process start before.
func TestOldPinWindowIsRecordedOnce(t *testing.T) {
	needCaddy(t)
	cutPinsOnDrained := func(t *testing.T, storage string) (int, *caddyProc) {
		bs := startBackends(t, 3)
		p := startCaddy(t, "upgrade", proxyConfig{Upstreams: addrsOf(bs), Policy: "key cookie " + appCookie, Storage: storage})
		c := newClient(t)
		first := c.visit(p.URL)
		pin, ok := c.cookie(p.URL, pinCookie)
		if first.failed() || !ok || len(pin) != 40 {
			t.Fatalf("first visit %s, pin %q", first, pin)
		}
		home := backendNamed(bs, first.Worker)
		p.setState(t, home.addr, "draining")
		landed := 0
		for range 5 {
			r := newClient(t).visitWith(p.URL, pinCookie+"="+pin[:24], nil)
			if r.failed() {
				t.Fatalf("cut pin: %s", r)
			}
			if r.Worker == home.name {
				landed++
			}
		}
		return landed, p
	}
	recorded := func(storage string) (int64, error) {
		b, err := os.ReadFile(filepath.Join(storage, "caddy-affinity", "pin-v3-since"))
		if err != nil {
			return 0, err
		}
		return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	}

	// A storage whose window opened an hour ago (an earlier start).
	old := t.TempDir()
	if err := os.MkdirAll(filepath.Join(old, "caddy-affinity"), 0o755); err != nil {
		t.Fatal(err)
	}
	hourAgo := time.Now().Add(-time.Hour).Unix()
	if err := os.WriteFile(filepath.Join(old, "caddy-affinity", "pin-v3-since"), []byte(fmt.Sprint(hourAgo)), 0o600); err != nil {
		t.Fatal(err)
	}
	landedOld, _ := cutPinsOnDrained(t, old)
	if since, err := recorded(old); err != nil || since != hourAgo {
		t.Errorf("the recorded window start changed: %d (%v), want %d", since, err, hourAgo)
	}

	// A fresh storage: the window opens now, and is recorded.
	fresh := t.TempDir()
	landedFresh, _ := cutPinsOnDrained(t, fresh)
	since, err := recorded(fresh)
	if err != nil || time.Since(time.Unix(since, 0)) > time.Minute {
		t.Errorf("no window start recorded in a fresh storage: %d (%v)", since, err)
	}
	t.Logf("FIGURES | a current pin cut to 24 chars, its worker draining | restart of a storage whose window closed: %d of 5 landed on it | fresh storage (window open): %d of 5 |",
		landedOld, landedFresh)
	if landedOld != 0 {
		t.Errorf("%d of 5 cut pins landed on the draining worker after the window closed", landedOld)
	}
	if landedFresh != 5 {
		t.Errorf("%d of 5 old-shaped pins honoured within the upgrade window, want 5", landedFresh)
	}
}
