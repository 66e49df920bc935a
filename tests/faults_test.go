package tests

// Issue "proof": the fault suite. Each test keeps a steady load of
// browsers on the proxy while one fault happens, and counts, per
// session, what the fault cost. The short form (default) runs in a few
// seconds each; AFFINITY_FAULTS=full runs more clients for longer.
//
// Figures are logged as "FIGURES | event | clients | requests | broken
// sessions | failed requests | restarted sessions | moved back |" for
// RELIABILITY.md:
//   - restarted sessions: sessions of the worker the fault took away that
//     restarted exactly once (expected: that is what losing a worker
//     costs an in-memory session);
//   - broken sessions: every other session that lost its state (a
//     session of another worker, a second restart, a count that jumped);
//   - failed requests: non-200 answers and transport errors;
//   - moved back: sessions that left a worker and were later served by
//     it again.

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// faultLoad is the steady load of the fault suite: clients, visits a
// client makes at least in each phase after the fault, and think time.
func faultLoad() (clients int, visitsAfter int64, think time.Duration) {
	return scale(100, 300), scale[int64](3, 10), 300 * time.Millisecond
}

// checkOthersIntact reports sessions that are not on a victim worker and
// broke or moved.
func checkOthersIntact(t *testing.T, clients []*client, owner map[*client]string, victims map[string]bool) {
	t.Helper()
	bad := 0
	for _, c := range clients {
		if victims[owner[c]] {
			continue
		}
		if c.worker != owner[c] {
			bad++
			if bad <= 5 {
				t.Errorf("a session of %s (not affected) moved to %s: %s", owner[c], c.worker, c)
			}
		}
	}
}

// checkVictimsRestartedOnce reports sessions of a victim worker that did
// not restart exactly once onto another worker.
func checkVictimsRestartedOnce(t *testing.T, clients []*client, owner map[*client]string, victims map[string]bool, phs ...*phase) {
	t.Helper()
	bad := 0
	for _, c := range clients {
		if !victims[owner[c]] {
			continue
		}
		restarts, breaks := 0, 0
		for _, ph := range phs {
			ph.mu.Lock()
			restarts += ph.restartsOf[c]
			breaks += ph.brokenOf[c]
			ph.mu.Unlock()
		}
		if restarts != 1 || breaks != 1 || victims[c.worker] {
			bad++
			if bad <= 5 {
				t.Errorf("a session of %s: %d restarts, %d breaks, now on %s; want exactly one restart onto another worker: %s",
					owner[c], restarts, breaks, c.worker, c)
			}
		}
	}
}

func victimCount(owner map[*client]string, victims map[string]bool) int {
	n := 0
	for _, w := range owner {
		if victims[w] {
			n++
		}
	}
	return n
}

// TestFaultSIGSTOP: a worker process (`caddy affinity worker`) is frozen
// with SIGSTOP for 4 s (full form: 10 s) under a steady load of 100
// clients (full: 300), then continued with SIGCONT. A frozen process
// still completes TCP handshakes (the kernel does), so only timeouts can
// tell: health_timeout 500ms marks it down, and response_header_timeout
// 2s ends the requests already sent to it, which Caddy retries (GET) and
// the policy fails over. Expected: only its sessions restart, each once;
// no request fails; nothing moves back after SIGCONT.
func TestFaultSIGSTOP(t *testing.T) {
	needCaddy(t)
	if !workerCommandAvailable() {
		t.Skip("`caddy affinity worker` is not in the binary")
	}
	nClients, visitsAfter, think := faultLoad()
	stopFor := scale(4*time.Second, 10*time.Second)
	procs := map[string]*workerProc{}
	var addrs []string
	for _, n := range []string{"A", "B", "C"} {
		addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		procs[n] = startWorkerProc(t, n, addr)
		addrs = append(addrs, addr)
	}
	p := startCaddy(t, "sigstop", proxyConfig{
		Upstreams:     addrs,
		Policy:        keyPolicy,
		TryDuration:   "6s",
		HealthTimeout: "500ms",
		ProxyExtra:    "transport http {\n\tdial_timeout 1s\n\tresponse_header_timeout 2s\n}",
	})
	clients := newClients(t, nClients)
	steady := newPhase("steady")
	l := startLoad(t, clients, p.URL, think, 100000, steady)
	l.waitEach(t, l.mark(), 2, 60*time.Second)
	owner := l.owners()
	victim := procs[busiestOf(owner)]
	victims := map[string]bool{victim.name: true}
	t.Logf("sessions: %d on %s, frozen for %s (pid %d)", victimCount(owner, victims), victim.name, stopFor, victim.cmd.Process.Pid)
	t.Cleanup(func() { _ = victim.cmd.Process.Signal(syscall.SIGCONT) })

	failLogs, upLogs := p.countLog(logCheckFailed, victim.addr), p.countLog(logHostUp, victim.addr)
	stopped := newPhase("frozen")
	l.setPhase(stopped)
	frozeAt := time.Now()
	if err := victim.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	p.waitLog(t, logCheckFailed, victim.addr, failLogs, stopFor)
	time.Sleep(time.Until(frozeAt.Add(stopFor))) // the fault's length
	if err := victim.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	after := newPhase("after SIGCONT")
	l.setPhase(after)
	p.waitLog(t, logHostUp, victim.addr, upLogs, 20*time.Second)
	l.waitEach(t, l.mark(), visitsAfter, 120*time.Second)
	l.stop()

	for _, ph := range []*phase{steady, stopped, after} {
		t.Log(ph)
	}
	rep := reportSessions(clients, owner, victims, steady, stopped, after)
	requests, failed := sumStats(steady, stopped, after)
	back := movedBack(clients, victim.name)
	if failed != 0 {
		t.Errorf("%d requests failed, want 0; samples:%s%s", failed, stopped.samplesText(), after.samplesText())
	}
	if rep.broken != 0 {
		t.Errorf("%d sessions broke beyond the frozen worker's single restarts: %s", rep.broken, strings.Join(rep.bad, "\n\t"))
	}
	checkVictimsRestartedOnce(t, clients, owner, victims, steady, stopped, after)
	checkOthersIntact(t, clients, owner, victims)
	if back != 0 {
		t.Errorf("%d sessions moved back to %s after SIGCONT", back, victim.name)
	}
	if after.broken != 0 || after.moved != 0 {
		t.Errorf("after SIGCONT: %d breaks and %d moves, want none: %s", after.broken, after.moved, after.samplesText())
	}
	logFigures(t, figures{event: fmt.Sprintf("SIGSTOP worker %s for %s, then SIGCONT", victim.name, stopFor),
		clients: nClients, requests: requests, broken: rep.broken, failed: failed, restarted: rep.restarted, moved: back})
}

// TestFaultReloadAddRemove: under a steady load, a config reload adds an
// upstream (D), then another removes one that holds sessions. The first
// reload moves no session at all; the second restarts the removed
// upstream's sessions, each once, and moves no other session.
func TestFaultReloadAddRemove(t *testing.T) {
	needCaddy(t)
	nClients, visitsAfter, think := faultLoad()
	bs := startBackends(t, 4)
	cfg := proxyConfig{Upstreams: addrsOf(bs[:3]), Policy: keyPolicy}
	p := startCaddy(t, "reload", cfg)
	p.affinity(t) // the module has looked at its first config
	clients := newClients(t, nClients)
	steady := newPhase("steady")
	l := startLoad(t, clients, p.URL, think, 100000, steady)
	l.waitEach(t, l.mark(), 2, 60*time.Second)
	owner := l.owners()

	added := newPhase("after adding D")
	l.setPhase(added)
	cfg.Upstreams = addrsOf(bs)
	p.reload(t, cfg)
	l.waitEach(t, l.mark(), visitsAfter, 120*time.Second)
	fresh := visitAll(newClients(t, 40), p.URL, 2, 20)
	expectClean(t, "40 new clients x 2 after adding D", fresh)
	if fresh.newPerWorker["D"] == 0 {
		t.Errorf("no new session landed on the added D: %s", sortedMap(fresh.newPerWorker))
	}

	mid := l.owners()
	var victim *backend
	for _, b := range bs[:3] {
		if victim == nil || victimCount(mid, map[string]bool{b.name: true}) > victimCount(mid, map[string]bool{victim.name: true}) {
			victim = b
		}
	}
	victims := map[string]bool{victim.name: true}
	// Visits sent while `caddy reload` runs may still meet the old
	// config; the ones sent after it returned may not.
	removing := newPhase("removing " + victim.name)
	l.setPhase(removing)
	var keep []*backend
	for _, b := range bs {
		if b != victim {
			keep = append(keep, b)
		}
	}
	cfg.Upstreams = addrsOf(keep)
	p.reload(t, cfg)
	removed := newPhase("after removing " + victim.name)
	l.setPhase(removed)
	l.waitEach(t, l.mark(), visitsAfter, 120*time.Second)
	l.stop()

	for _, ph := range []*phase{steady, added, removing, removed} {
		t.Log(ph)
	}
	// The add.
	addRep := reportSessions(clients, owner, nil, steady, added)
	addReq, addFailed := sumStats(steady, added)
	if addFailed != 0 || addRep.broken != 0 || added.moved != 0 {
		t.Errorf("adding D: %d failed requests, %d broken sessions, %d moves, want none: %s", addFailed, addRep.broken, added.moved,
			strings.Join(addRep.bad, "\n\t"))
	}
	logFigures(t, figures{event: "reload adding upstream D", clients: nClients, requests: addReq,
		broken: addRep.broken, failed: addFailed, moved: added.moved})
	// The removal.
	remRep := reportSessions(clients, mid, victims, removing, removed)
	remReq, remFailed := sumStats(removing, removed)
	if remFailed != 0 {
		t.Errorf("removing %s: %d requests failed, want 0; samples:%s%s", victim.name, remFailed, removing.samplesText(), removed.samplesText())
	}
	if remRep.broken != 0 {
		t.Errorf("removing %s: %d sessions broke beyond its own single restarts: %s", victim.name, remRep.broken, strings.Join(remRep.bad, "\n\t"))
	}
	checkVictimsRestartedOnce(t, clients, mid, victims, removing, removed)
	checkOthersIntact(t, clients, mid, victims)
	if n := removed.perWorker[victim.name]; n != 0 {
		t.Errorf("the removed %s served %d visits sent after the reload", victim.name, n)
	}
	t.Logf("removing %s: %d of its %d sessions restarted once", victim.name, remRep.restarted, victimCount(mid, victims))
	logFigures(t, figures{event: "reload removing upstream " + victim.name + " (with sessions)", clients: nClients, requests: remReq,
		broken: remRep.broken, failed: remFailed, restarted: remRep.restarted, moved: movedBack(clients, victim.name)})
}

// TestFaultGracefulRestart: `caddy stop`, then `caddy run` again with the
// same Caddyfile and storage (no `secret` line: the generated one is kept
// in storage), under a steady load. The new process has an empty session
// table, so only the pin cookie keeps sessions on their workers: no
// session breaks or moves. The requests sent while no process listened
// fail (connection refused); none fails before or after.
func TestFaultGracefulRestart(t *testing.T) {
	needCaddy(t)
	nClients, visitsAfter, think := faultLoad()
	bs := startBackends(t, 3)
	storage := t.TempDir()
	p := startCaddy(t, "graceful", proxyConfig{Upstreams: addrsOf(bs), Policy: keyPolicy, Storage: storage})
	secretFile := filepath.Join(storage, "caddy-affinity", "pin-secret")
	secret1, err := os.ReadFile(secretFile)
	if err != nil {
		t.Fatalf("no generated pin secret in storage: %v", err)
	}
	clients := newClients(t, nClients)
	steady := newPhase("steady")
	l := startLoad(t, clients, p.URL, think, 100000, steady)
	l.waitEach(t, l.mark(), 2, 60*time.Second)
	owner := l.owners()

	gap := newPhase("stop and start")
	l.setPhase(gap)
	down := time.Now()
	p.stopNow(t, "caddy stop")
	p.startAgain(t)
	outage := time.Since(down)
	after := newPhase("after the restart")
	l.setPhase(after)
	l.waitEach(t, l.mark(), visitsAfter, 120*time.Second)
	l.stop()

	for _, ph := range []*phase{steady, gap, after} {
		t.Log(ph)
	}
	if secret2, err := os.ReadFile(secretFile); err != nil || !bytes.Equal(secret1, secret2) {
		t.Errorf("the pin secret in storage changed across the restart (%v)", err)
	}
	rep := reportSessions(clients, owner, nil, steady, gap, after)
	requests, failed := sumStats(steady, gap, after)
	t.Logf("no process listened for about %s; %d requests sent then failed", outage.Round(time.Millisecond), gap.failed)
	if rep.broken != 0 {
		t.Errorf("%d sessions broke across the restart, want 0: %s", rep.broken, strings.Join(rep.bad, "\n\t"))
	}
	checkOthersIntact(t, clients, owner, nil)
	if steady.failed != 0 || after.failed != 0 {
		t.Errorf("%d requests failed before the stop and %d after the start, want 0: %s%s",
			steady.failed, after.failed, steady.samplesText(), after.samplesText())
	}
	if gap.status5xx != 0 {
		t.Errorf("%d requests got a 5xx during the restart, want only refused connections: %s", gap.status5xx, gap.samplesText())
	}
	logFigures(t, figures{event: fmt.Sprintf("caddy stop + run (down %s)", outage.Round(100*time.Millisecond)),
		clients: nClients, requests: requests, broken: rep.broken, failed: failed, moved: after.moved + gap.moved})
}

// TestFaultInstanceRestart: two instances share storage (and so the
// generated secret); every client alternates between them, falling back
// to the other one when a connection is refused, as a browser does with
// the addresses of a name. Instance two is stopped (SIGTERM) and started
// again mid-load: no session breaks or moves, no request fails.
func TestFaultInstanceRestart(t *testing.T) {
	needCaddy(t)
	nClients, visitsAfter, think := faultLoad()
	bs := startBackends(t, 3)
	cfg := proxyConfig{Upstreams: addrsOf(bs), Policy: keyPolicy, Storage: t.TempDir()}
	one := launchCaddy(t, "one", cfg)
	two := launchCaddy(t, "two", cfg)
	one.waitReady(t)
	two.waitReady(t)
	urls := []string{one.URL, two.URL} // the same ports across the restart
	targets := func(c *client, i int) []string {
		k := (c.id + i) % 2
		return []string{urls[k], urls[1-k]}
	}
	clients := newClients(t, nClients)
	steady := newPhase("steady")
	l := startLoadMulti(t, clients, targets, think, 100000, steady)
	l.waitEach(t, l.mark(), 2, 60*time.Second)
	owner := l.owners()

	gap := newPhase("two restarting")
	l.setPhase(gap)
	down := time.Now()
	two.stopNow(t, "SIGTERM")
	two.startAgain(t)
	outage := time.Since(down)
	after := newPhase("after two's restart")
	l.setPhase(after)
	l.waitEach(t, l.mark(), visitsAfter, 120*time.Second)
	l.stop()

	for _, ph := range []*phase{steady, gap, after} {
		t.Log(ph)
	}
	rep := reportSessions(clients, owner, nil, steady, gap, after)
	requests, failed := sumStats(steady, gap, after)
	t.Logf("instance two was down about %s; %d visits fell back to instance one", outage.Round(time.Millisecond), l.fallbacks.Load())
	if failed != 0 {
		t.Errorf("%d requests failed, want 0: %s%s", failed, gap.samplesText(), after.samplesText())
	}
	if rep.broken != 0 {
		t.Errorf("%d sessions broke, want 0: %s", rep.broken, strings.Join(rep.bad, "\n\t"))
	}
	checkOthersIntact(t, clients, owner, nil)
	logFigures(t, figures{event: fmt.Sprintf("restart of instance two of two (down %s, clients alternate)", outage.Round(100*time.Millisecond)),
		clients: nClients, requests: requests, broken: rep.broken, failed: failed, moved: after.moved + gap.moved})
}
