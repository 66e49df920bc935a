package affinity

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// The session table is process-wide and lives in a caddy.UsagePool, so a
// config reload (where the new config is provisioned before the old one
// is cleaned up) hands the same table to the new policies: no session is
// forgotten by a reload. Entries name upstreams by their process-wide ID,
// so policies in front of different upstreams cannot confuse each other's
// entries even though they share the table.
var tables = caddy.NewUsagePool()

// liveTable is the table in the pool, for metrics scrapes and the admin
// API, which have no policy at hand.
var liveTable atomic.Pointer[sharedTable]

// currentTable returns the live session table, or nil before any policy
// is provisioned.
func currentTable() *sharedTable { return liveTable.Load() }

const tableKey = "sessions"

// sweepInterval is how often expired entries are deleted and the live
// session counts per upstream are published; the farm watcher runs twice
// as often.
const sweepInterval = 2 * time.Second

// sharedTable is the UsagePool value: the table plus its sweeper, and the
// max_sessions wanted by each live policy (the largest one applies).
type sharedTable struct {
	*sessionTable

	mu    sync.Mutex
	wants map[*Policy]int
	stop  chan struct{}
	done  chan struct{}
}

func acquireTable(p *Policy) (*sharedTable, error) {
	val, _, err := tables.LoadOrNew(tableKey, func() (caddy.Destructor, error) {
		st := &sharedTable{
			sessionTable: newSessionTable(p.MaxSessions),
			wants:        make(map[*Policy]int),
			stop:         make(chan struct{}),
			done:         make(chan struct{}),
		}
		go st.sweepLoop()
		liveTable.Store(st)
		return st, nil
	})
	if err != nil {
		return nil, err
	}
	st := val.(*sharedTable)
	st.want(p, p.MaxSessions)
	return st, nil
}

// want records the bound a policy asks for (0 removes it) and applies the
// largest one.
func (st *sharedTable) want(p *Policy, maxSessions int) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if maxSessions > 0 {
		st.wants[p] = maxSessions
	} else {
		delete(st.wants, p)
	}
	largest := 0
	for _, n := range st.wants {
		largest = max(largest, n)
	}
	if largest > 0 {
		st.setMax(largest)
	}
}

func (p *Policy) releaseTable() {
	if p.table == nil {
		return
	}
	p.table.want(p, 0)
	_, _ = tables.Delete(tableKey)
	p.table = nil
}

func (st *sharedTable) sweepLoop() {
	defer close(st.done)
	tick := time.NewTicker(sweepInterval / 2)
	defer tick.Stop()
	for n := 0; ; n++ {
		select {
		case <-st.stop:
			return
		case now := <-tick.C:
			watchFarm()
			if n%2 == 1 {
				st.sweep(tableNow(now))
			}
		}
	}
}

// Destruct stops the sweeper when the last policy lets go of the table.
func (st *sharedTable) Destruct() error {
	liveTable.CompareAndSwap(st, nil)
	close(st.stop)
	<-st.done
	return nil
}

var _ caddy.Destructor = (*sharedTable)(nil)
