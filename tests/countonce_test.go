package tests

import (
	"testing"
)

// sessionsCounted returns the sessions the admin API counts on every
// upstream, added up, and per address.
func sessionsCounted(t *testing.T, p *caddyProc) (int64, map[string]int64) {
	t.Helper()
	per := map[string]int64{}
	var sum int64
	for addr, u := range p.affinity(t) {
		per[addr] = u.Sessions
		sum += u.Sessions
	}
	return sum, per
}

// TestMovedSessionsCountOnce: a worker dies and its sessions move; the
// app issues each of them a new id on its new worker, and the id it
// replaced stops counting at once (affinity_learn sees both). The admin
// API's `sessions` then counts browsers, not ids. (Before: 400 browsers
// showed as 512 sessions for a session_ttl after a worker left.)
func TestMovedSessionsCountOnce(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddySite(t, "countonce", learnSite(addrsOf(bs), "affinity_learn", "key cookie "+appCookie))
	clients := newClients(t, 150)
	expectClean(t, "150 browsers x 3", visitAll(clients, p.URL, 3, 50))
	before, _ := sessionsCounted(t, p)
	owner := ownerMap(clients)
	victim := backendNamed(bs, busiest(clients))
	victim.kill()
	s := visitAll(clients, p.URL, 3, 50)
	checkFailover(t, "after the kill (150 x 3)", clients, owner, victim.name, 3, s)
	after, per := sessionsCounted(t, p)
	moved := 0
	for _, c := range clients {
		if owner[c] == victim.name {
			moved++
		}
	}
	t.Logf("FIGURES | worker killed, affinity_learn, pin cookie | %d browsers, %d moved | sessions counted before %d, after %d (%v) |",
		len(clients), moved, before, after, per)
	if before != int64(len(clients)) || after != int64(len(clients)) {
		t.Errorf("sessions counted: %d before, %d after the kill, want %d (one per browser)", before, after, len(clients))
	}
}
