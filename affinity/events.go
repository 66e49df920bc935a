package affinity

import (
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// Recent failovers, for the status page: an operator who sees sessions
// move wants to know from where, to where, why and when, without digging
// through the logs. The log is process-wide and small; the full record
// stays in Caddy's log ("session failed over").

const (
	// failoverLogSize is how many distinct failover events are kept.
	failoverLogSize = 50
	// failoverCoalesce is how close together failovers with the same
	// from, to and reason must be to count as one event. Killing a worker
	// moves each of its sessions on its next request, a burst of
	// identical failovers that would otherwise push every older event out
	// of the log.
	failoverCoalesce = 10 * time.Second
)

// FailoverEvent is one or more failovers with the same from, to and
// reason, close together in time.
type FailoverEvent struct {
	// From and To are the dial addresses of the upstream the sessions
	// left and the one they were given.
	From string `json:"from"`
	To   string `json:"to"`
	// Reason says why they left, as in the log.
	Reason string `json:"reason"`
	// Count is how many failovers the event stands for.
	Count int `json:"count"`
	// First and Last are when the first and the latest of them happened.
	First time.Time `json:"first"`
	Last  time.Time `json:"last"`
}

// failoverLog is a ring buffer of recent failover events.
type failoverLog struct {
	mu     sync.Mutex
	events [failoverLogSize]FailoverEvent
	next   int    // where the next new event goes
	n      int    // events held, up to failoverLogSize
	total  uint64 // failovers recorded since the process started
}

// failovers is the process-wide log; Select records into it.
var failovers failoverLog

// record notes one failover, merging it into a recent event with the
// same from, to and reason. It runs on the request path, but only for
// failovers, which are rare next to pinned requests.
func (l *failoverLog) record(from, to, reason string) {
	l.recordAt(from, to, reason, time.Now())
}

func (l *failoverLog) recordAt(from, to, reason string, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total++
	for k := 1; k <= l.n; k++ {
		// All of them, newest first: a burst from one worker to two
		// others interleaves two events.
		e := &l.events[(l.next-k+failoverLogSize)%failoverLogSize]
		if e.From == from && e.To == to && e.Reason == reason && now.Sub(e.Last) <= failoverCoalesce {
			e.Count++
			e.Last = now
			return
		}
	}
	l.events[l.next] = FailoverEvent{From: from, To: to, Reason: reason, Count: 1, First: now, Last: now}
	l.next = (l.next + 1) % failoverLogSize
	if l.n < failoverLogSize {
		l.n++
	}
}

// snapshot returns the events, the most recently active first, and the
// total number of failovers recorded.
func (l *failoverLog) snapshot() ([]FailoverEvent, uint64) {
	l.mu.Lock()
	out := make([]FailoverEvent, 0, l.n)
	for k := 1; k <= l.n; k++ {
		out = append(out, l.events[(l.next-k+failoverLogSize)%failoverLogSize])
	}
	total := l.total
	l.mu.Unlock()
	// Newest first by creation already; a merge may have made an older
	// event the latest active one.
	sortEventsByLast(out)
	return out, total
}

// sortEventsByLast sorts events by Last, newest first, keeping the
// creation order of ties (insertion sort: at most 50 nearly sorted
// events).
func sortEventsByLast(es []FailoverEvent) {
	for i := 1; i < len(es); i++ {
		for j := i; j > 0 && es[j].Last.After(es[j-1].Last); j-- {
			es[j], es[j-1] = es[j-1], es[j]
		}
	}
}

// logFailover logs a session's failover and records it for the status
// page.
func (p *Policy) logFailover(from, to string, why healthcheck.Verdict) {
	p.logger.Info("session failed over",
		zap.String("from", from),
		zap.String("to", to),
		zap.String("reason", why.String()))
	failovers.record(from, to, why.String())
}
