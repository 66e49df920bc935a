package sessions

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// `store redis`: a Redis server shared by every instance that uses it,
// behind the process's table, which stays the hot path:
//
//   - a key the local table knows costs no round trip;
//   - a key it does not know costs one (GETs of the request's keys), and
//     what Redis names is kept locally;
//   - a key is written once it is established (its second request) or
//     when the app issued it (affinity_learn), moves at once, and a live
//     entry's sliding expiry when it crosses a quarter of the TTL (see
//     Handle.due): a flood of one-shot keys never reaches Redis, and new
//     entries are bounded by max_sessions (Handle.admit);
//   - moves, retired and deleted ids are published, so that the
//     instances that know the key locally follow at once.
//
// Every key is in a namespace: the policy's site (or its scope), the
// same on every instance serving that site, so that two sites of one
// process never touch each other's entries. Every key has a TTL.
// Upstreams are named by dial address, never by process-local IDs.
//
// A request waits for Redis at most the timeout in all (Budget). When
// Redis fails or is slow the local table decides alone, and after
// redisTrip errors with no success Redis is skipped for a second (a
// circuit). Errors are counted in caddy_affinity_store_errors_total; an
// outage is logged once, and lookups that failed (sessions this instance
// did not know may have been placed anew) are logged, rate-limited.

// redisSkip is how long Redis is skipped after redisTrip errors with no
// success for redisQuiet: a few slow answers in a burst while others
// succeed must not cut a second of sessions off the store; a dead or
// hung server fails three operations, then is skipped.
const (
	redisSkip  = time.Second
	redisTrip  = 3
	redisQuiet = 250 * time.Millisecond
)

// clientKey tells clients apart: policies that name the same server,
// credentials, db and key prefix share one.
type clientKey struct {
	addr, username, password string
	db                       int
	tls                      bool
	prefix                   string
	timeout                  time.Duration
}

// redisClient is one connection pool to Redis, its subscriber, its
// circuit and what it knows of Redis's run, shared by the namespaces
// (handles) that use it. The Store owns it; its last namespace closes it.
type redisClient struct {
	store   *Store
	key     clientKey
	client  redis.UniversalClient
	prefix  string // <key_prefix>
	channel string // of published changes
	runKey  string
	nonce   string // tells this instance's messages from others'
	timeout time.Duration
	logger  *zap.Logger

	skipUntil atomic.Int64 // unix nanoseconds: Redis is skipped until then
	fails     atomic.Int32 // errors since the last success
	lastOK    atomic.Int64 // unix nanoseconds of the last success
	down      atomic.Bool  // the outage was logged
	// outageSince is the table second the circuit opened (0: closed
	// since the last write back): entries touched since then are
	// written back once Redis answers.
	outageSince atomic.Uint32
	lookups     logLimit // failed lookups, logged rate-limited

	// run is the id of Redis's current run as last read (see runKey);
	// touched only by checkRun, one at a time (checking).
	run      string
	checking atomic.Bool
	checked  atomic.Int64 // unix nanoseconds of the last check

	mu         sync.Mutex
	namespaces map[*redisNS]struct{}
	refs       int

	ctx    context.Context // cancelled by close: a write back stops
	cancel context.CancelFunc
	sub    *redis.PubSub
	done   chan struct{}
	once   sync.Once
}

var redisLogOnce sync.Once

// redisLogger is go-redis's logger: Caddy's, at debug level.
type redisLogger struct{ l *zap.Logger }

func (r redisLogger) Printf(_ context.Context, format string, v ...any) {
	if ce := r.l.Check(zap.DebugLevel, "go-redis"); ce != nil {
		ce.Write(zap.String("message", fmt.Sprintf(format, v...)))
	}
}

var storeErrors = prometheus.NewCounter(prometheus.CounterOpts{
	Namespace: "caddy", Subsystem: "affinity", Name: "store_errors_total",
	Help: "Operations of the shared session store (store redis) that failed or timed out; the local session table decided alone.",
})

// RegisterMetrics registers caddy_affinity_store_errors_total into a
// config's registry (each config load has a fresh one; the counter goes
// on across reloads).
func RegisterMetrics(reg *prometheus.Registry) error {
	if reg == nil {
		return nil
	}
	if err := reg.Register(storeErrors); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			return err
		}
	}
	return nil
}

// redisKeyOf returns the client key of a config, placeholders replaced.
func redisKeyOf(c *Config) clientKey {
	repl := caddy.NewReplacer()
	k := clientKey{
		addr:     repl.ReplaceKnown(c.Address, ""),
		username: repl.ReplaceKnown(c.Username, ""),
		password: repl.ReplaceKnown(c.Password, ""),
		db:       c.DB,
		tls:      c.TLS,
		prefix:   c.KeyPrefix,
		timeout:  time.Duration(c.Timeout),
	}
	if k.prefix == "" {
		k.prefix = DefaultRedisKeyPrefix
	}
	if k.timeout == 0 {
		k.timeout = time.Duration(DefaultRedisTimeout)
	}
	return k
}

// newUniversalClient is the one place a Redis client is built from a
// store's options (nothing here waits for Redis, so that a start or
// reload never hangs on it).
func newUniversalClient(k clientKey) redis.UniversalClient {
	opts := &redis.UniversalOptions{
		Addrs:    []string{k.addr},
		Username: k.username,
		Password: k.password,
		DB:       k.db,
		// Every wait is bounded by the request's budget (the context's
		// deadline) and the timeout, and a failed command is not
		// retried: the local table answers instead.
		ContextTimeoutEnabled: true,
		DialTimeout:           k.timeout,
		ReadTimeout:           k.timeout,
		WriteTimeout:          k.timeout,
		PoolTimeout:           k.timeout,
		MaxRetries:            -1,
		// No CLIENT SETINFO on every new connection.
		DisableIdentity: true,
		// Connections dialled ahead, in the background, so that a
		// burst of requests seldom waits for a dial.
		MinIdleConns: 8,
	}
	if k.tls {
		host, _, err := net.SplitHostPort(k.addr)
		if err != nil {
			host = k.addr
		}
		opts.TLSConfig = &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	}
	return redis.NewUniversalClient(opts)
}

// client returns the store's client for c, started on first use.
func (s *Store) client(c *Config, logger *zap.Logger) (*redisClient, error) {
	k := redisKeyOf(c)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errors.New("the session store is closed")
	}
	if rc := s.clients[k]; rc != nil {
		rc.mu.Lock()
		rc.refs++
		rc.mu.Unlock()
		return rc, nil
	}
	// go-redis logs through a process-wide logger to stderr, a line per
	// failed dial: send it to Caddy's log at debug level, since the
	// store logs an outage once itself.
	redisLogOnce.Do(func() { redis.SetLogger(redisLogger{caddy.Log().Named("affinity.store.redis")}) })
	var nb [8]byte
	_, _ = rand.Read(nb[:])
	rc := &redisClient{
		store:      s,
		key:        k,
		client:     newUniversalClient(k),
		prefix:     k.prefix,
		channel:    k.prefix + ":changes",
		runKey:     k.prefix + ":run",
		nonce:      hex.EncodeToString(nb[:]),
		timeout:    k.timeout,
		logger:     logger,
		namespaces: make(map[*redisNS]struct{}),
		refs:       1,
		done:       make(chan struct{}),
	}
	rc.ctx, rc.cancel = context.WithCancel(context.Background())
	rc.sub = rc.client.Subscribe(rc.ctx, rc.channel)
	go rc.listen()
	// Read Redis's run id now, before this instance writes (without
	// waiting: a start never waits for Redis), so that a first instance
	// does not take its own writes for what a restarted Redis lost.
	go rc.checkRun(true)
	s.clients[k] = rc
	return rc, nil
}

// release drops one reference; the last closes the client.
func (c *redisClient) release() {
	c.store.mu.Lock()
	c.mu.Lock()
	c.refs--
	last := c.refs == 0
	c.mu.Unlock()
	if last && c.store.clients[c.key] == c {
		delete(c.store.clients, c.key)
	}
	c.store.mu.Unlock()
	if last {
		c.close()
	}
}

// close stops the subscriber and the connections; it never waits for
// Redis.
func (c *redisClient) close() {
	c.once.Do(func() {
		c.cancel()
		_ = c.sub.Close()
		// The subscriber ends when its channel closes, at once; the
		// bound only guards a stop or reload against a client bug.
		select {
		case <-c.done:
		case <-time.After(time.Second):
			c.logger.Warn("the redis store's subscriber did not stop within 1s; going on")
		}
		_ = c.client.Close()
	})
}

// open adds namespace ns of handle h to the client.
func (c *redisClient) open(h *Handle, ns string) *redisNS {
	if ns == "" {
		ns = "-"
	}
	n := &redisNS{c: c, h: h, ns: ns, entries: c.prefix + ":s:" + ns + ":", live: c.prefix + ":live:" + ns + ":"}
	c.mu.Lock()
	c.namespaces[n] = struct{}{}
	c.mu.Unlock()
	return n
}

// listen applies the changes other instances publish until close.
func (c *redisClient) listen() {
	defer close(c.done)
	for msg := range c.sub.Channel() {
		// "<op> <nonce> <namespace> <key hex> [<a|s>|<dial>]"
		f := strings.SplitN(msg.Payload, " ", 5)
		if len(f) < 4 || len(f[0]) != 1 || f[1] == c.nonce {
			continue
		}
		key, err := strconv.ParseUint(f[3], 16, 64)
		if err != nil {
			continue
		}
		var e remoteEntry
		if len(f) == 5 {
			if e, err = parseRemote(f[4]); err != nil {
				continue
			}
		}
		c.mu.Lock()
		for n := range c.namespaces {
			if n.ns == f[2] {
				n.apply(f[0][0], key, e)
			}
		}
		c.mu.Unlock()
	}
}

// usable reports whether Redis is asked now (the circuit is closed).
func (c *redisClient) usable() bool {
	return time.Now().UnixNano() >= c.skipUntil.Load()
}

// failed counts an error; the redisTrip-th in a row skips Redis for a
// moment and logs the outage, once.
func (c *redisClient) failed(op string, err error) {
	storeErrors.Inc()
	now := time.Now()
	if c.fails.Add(1) < redisTrip || now.UnixNano()-c.lastOK.Load() < int64(redisQuiet) {
		return
	}
	c.skipUntil.Store(now.Add(redisSkip).UnixNano())
	// Writes are skipped from now on: the sessions touched meanwhile
	// are written back once Redis answers again.
	c.outageSince.CompareAndSwap(0, Now())
	if c.down.CompareAndSwap(false, true) {
		c.logger.Warn("the redis session store failed; the local session table decides alone, and redis is tried again every second (logged once per outage; counted in caddy_affinity_store_errors_total)",
			zap.String("op", op), zap.Error(err))
	}
}

// worked notes a success, ending a logged outage.
func (c *redisClient) worked() {
	c.lastOK.Store(time.Now().UnixNano())
	if c.fails.Load() != 0 {
		c.fails.Store(0)
		c.skipUntil.Store(0) // it answers: stop skipping it
	}
	if c.down.Load() && c.down.CompareAndSwap(true, false) {
		c.logger.Info("the redis session store answers again")
	}
}

// checkRun reads Redis's run id (writing one if there is none) at most
// once a second; when Redis lost its data (another run id), or when the
// circuit opened since the last write back, every namespace writes back.
// first only reads it (the client's start).
func (c *redisClient) checkRun(first bool) {
	now := time.Now()
	if !first && now.UnixNano()-c.checked.Load() < int64(time.Second) {
		return
	}
	if !c.usable() || !c.checking.CompareAndSwap(false, true) {
		return
	}
	defer c.checking.Store(false)
	c.checked.Store(now.UnixNano())
	ctx, cancel := context.WithTimeout(c.ctx, c.timeout)
	defer cancel()
	var set *redis.BoolCmd
	var get *redis.StringCmd
	_, err := c.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
		// A fresh candidate each time: an instance whose own id was the
		// run id before a restart must not find it again.
		set = pipe.SetNX(ctx, c.runKey, c.nonce+"."+strconv.FormatInt(now.UnixNano(), 36), 0)
		get = pipe.Get(ctx, c.runKey)
		return nil
	})
	if err != nil {
		if !first {
			c.failed("run", err)
		}
		return
	}
	c.worked()
	run := get.Val()
	// Lost: another run id than the last one read, or none before this
	// one and this instance wrote it (the first to find Redis empty).
	lost := (c.run != "" && run != c.run) || (c.run == "" && set.Val() && !first)
	c.run = run
	if first {
		return
	}
	since := c.outageSince.Load()
	if !lost && since == 0 {
		return
	}
	c.outageSince.Store(0)
	reason, from := "the circuit was open", since
	if lost {
		reason, from = "redis lost its data (restarted or flushed)", 0
	}
	c.mu.Lock()
	for n := range c.namespaces {
		n.startResync(reason, from)
	}
	c.mu.Unlock()
}

// redisNS is one handle's namespace on a client.
type redisNS struct {
	c       *redisClient
	h       *Handle
	ns      string
	entries string // prefix of entry keys: <key_prefix>:s:<ns>:
	live    string // prefix of live sets: <key_prefix>:live:<ns>:

	// counts is the cluster's live sessions per dial, as the farm's
	// loop last read them, with this instance's own count at that
	// moment (see clusterLoad).
	counts   atomic.Pointer[map[string]clusterCount]
	counting atomic.Bool // a refresh is under way
	// dials are the upstreams of the last refresh, for write backs.
	dials atomic.Pointer[[]string]

	resyncing atomic.Bool // a write back is under way
	again     atomic.Bool // another was asked for meanwhile
	againFrom atomic.Uint32
	closed    atomic.Bool
}

func (n *redisNS) key(k uint64) string        { return n.entries + strconv.FormatUint(k, 16) }
func (n *redisNS) liveKey(dial string) string { return n.live + dial }

func remoteValue(dial string, alias bool) string {
	if alias {
		return "a|" + dial
	}
	return "s|" + dial
}

func parseRemote(v string) (remoteEntry, error) {
	if len(v) < 3 || v[1] != '|' || (v[0] != 'a' && v[0] != 's') {
		return remoteEntry{}, errors.New("malformed entry")
	}
	return remoteEntry{dial: v[2:], alias: v[0] == 'a', ok: true}, nil
}

// remoteTTL is how long Redis keeps an entry written with a session TTL
// of ttl seconds: a quarter more, since the sliding expiry is written
// back only when it crosses a quarter.
func remoteTTL(ttl uint32) time.Duration {
	return time.Duration(ttl+writeBackQuantum(ttl)) * time.Second
}

func (n *redisNS) close() {
	if !n.closed.CompareAndSwap(false, true) {
		return
	}
	n.c.mu.Lock()
	delete(n.c.namespaces, n)
	n.c.mu.Unlock()
	n.c.release()
}

// fetch returns what Redis holds for keys, in one round trip; nil when
// Redis is skipped, failed or the budget is spent.
func (n *redisNS) fetch(keys []uint64, deadline time.Time) []remoteEntry {
	if !n.c.usable() {
		return nil
	}
	ctx, cancel, ok := deadlineContext(deadline)
	if !ok {
		return nil
	}
	defer cancel()
	// One GET a key, pipelined: a request's keys are in different hash
	// slots (Redis Cluster), which one MGET could not read.
	cmds := make([]*redis.StringCmd, len(keys))
	_, err := n.c.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = pipe.Get(ctx, n.key(k))
		}
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		n.c.failed("get", err)
		n.c.lookups.log(n.c.logger, "a redis lookup failed: a session this instance did not know may have been placed anew (counted in caddy_affinity_store_errors_total)",
			zap.Error(err))
		return nil
	}
	n.c.worked()
	out := make([]remoteEntry, len(keys))
	for i, cmd := range cmds {
		if v, err := cmd.Result(); err == nil {
			out[i], _ = parseRemote(v)
		}
	}
	return out
}

// record writes the entries of ws in one round trip; a move is
// published, so that instances knowing the key follow. A session's main
// entry is also counted in the dial's live set.
func (n *redisNS) record(ws []remoteWrite, deadline time.Time) {
	if !n.c.usable() {
		return
	}
	ctx, cancel, ok := deadlineContext(deadline)
	if !ok {
		return
	}
	defer cancel()
	ttl := n.h.ttl
	_, err := n.c.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
		for _, w := range ws {
			n.queueWrite(ctx, pipe, w, ttl)
		}
		return nil
	})
	if err != nil {
		n.c.failed("set", err)
		return
	}
	n.c.worked()
}

// queueWrite queues the commands of one write on pipe.
func (n *redisNS) queueWrite(ctx context.Context, pipe redis.Pipeliner, w remoteWrite, ttl uint32) {
	v := remoteValue(w.dial, w.alias)
	k := n.key(w.key)
	member := strconv.FormatUint(w.key, 16)
	if w.how == writeNew {
		pipe.SetNX(ctx, k, v, remoteTTL(ttl))
	} else {
		pipe.Set(ctx, k, v, remoteTTL(ttl))
	}
	if !w.alias {
		// Scored by when Redis lets the entry go, which is never
		// before the session's local expiry: the count errs on the
		// side of more sessions, so `drained` is never early. The set
		// itself goes with its last session (a removed upstream's
		// too).
		until := time.Now().Add(remoteTTL(ttl))
		pipe.ZAdd(ctx, n.liveKey(w.dial), redis.Z{Score: float64(until.Unix()), Member: member})
		pipe.ExpireAt(ctx, n.liveKey(w.dial), until.Add(time.Second))
	}
	if w.how == writeMove {
		// Not counted where it was: it left that dial, or it became
		// an alias there.
		if w.from != "" && (w.from != w.dial || w.alias) {
			pipe.ZRem(ctx, n.liveKey(w.from), member)
		}
		pipe.Publish(ctx, n.c.channel, "m "+n.c.nonce+" "+n.ns+" "+member+" "+v)
	}
}

// retire makes key expire within RetireGrace at the latest, here and on
// every instance; dial, if known, is where it was counted.
func (n *redisNS) retire(key uint64, dial string, deadline time.Time) {
	n.change('r', key, deadline, func(ctx context.Context, pipe redis.Pipeliner) {
		pipe.ExpireLT(ctx, n.key(key), RetireGrace*time.Second)
		if dial != "" {
			until := float64(time.Now().Add(RetireGrace * time.Second).Unix())
			pipe.ZAddArgs(ctx, n.liveKey(dial), redis.ZAddArgs{XX: true, LT: true,
				Members: []redis.Z{{Score: until, Member: strconv.FormatUint(key, 16)}}})
		}
	})
}

// forget deletes key, here and on every instance; dial, if known, is
// where it was counted.
func (n *redisNS) forget(key uint64, dial string, deadline time.Time) {
	n.change('d', key, deadline, func(ctx context.Context, pipe redis.Pipeliner) {
		pipe.Del(ctx, n.key(key))
		if dial != "" {
			pipe.ZRem(ctx, n.liveKey(dial), strconv.FormatUint(key, 16))
		}
	})
}

// change runs cmd and publishes op for key, in one round trip.
func (n *redisNS) change(op byte, key uint64, deadline time.Time, cmd func(context.Context, redis.Pipeliner)) {
	if !n.c.usable() {
		return
	}
	ctx, cancel, ok := deadlineContext(deadline)
	if !ok {
		return
	}
	defer cancel()
	_, err := n.c.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
		cmd(ctx, pipe)
		pipe.Publish(ctx, n.c.channel, string(op)+" "+n.c.nonce+" "+n.ns+" "+strconv.FormatUint(key, 16))
		return nil
	})
	if err != nil {
		n.c.failed("change", err)
		return
	}
	n.c.worked()
}

// apply applies a change another instance published to the local
// table, for keys it knows (others are asked for when they are seen).
func (n *redisNS) apply(op byte, key uint64, e remoteEntry) {
	table := n.h.table
	now := Now()
	k := n.h.Key(key)
	switch op {
	case 'm':
		old, ok := table.Peek(k, now)
		if !ok {
			return
		}
		up := healthcheck.Get(e.dial).ID
		if e.alias {
			up |= AliasBit
		}
		if old.Ref()&^EstablishedBit != up {
			// Established: Redis has it.
			table.Put(k, up, now, old.Expires()-now)
			table.Establish(k, now)
		}
	case 'r':
		table.Retire(k, now+RetireGrace)
	case 'd':
		table.Remove(k)
	}
}

// clusterCount is the cluster's live sessions on a dial as last read,
// and this instance's own (its table's exact count) just before.
type clusterCount struct{ n, localAt int64 }

// refresh reads the cluster's live sessions on dials (dropping the
// expired ones first), in one round trip, in the background: the farm's
// loop calls it every second and never waits for Redis. The client then
// checks Redis's run (see checkRun).
func (n *redisNS) refresh(dials []string) {
	if len(dials) > 0 {
		d := append([]string(nil), dials...)
		n.dials.Store(&d)
	}
	if !n.c.usable() || !n.counting.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer n.counting.Store(false)
		n.c.checkRun(false)
		if len(dials) == 0 {
			return
		}
		// This instance's counts before Redis's: a session placed in
		// between is counted in both, once too many, never missed.
		at := make([]int64, len(dials))
		for i, d := range dials {
			if rec := healthcheck.Lookup(d); rec != nil {
				at[i] = max(0, n.h.table.LiveCount(rec.ID))
			}
		}
		ctx, cancel := context.WithTimeout(n.c.ctx, n.c.timeout)
		defer cancel()
		now := strconv.FormatInt(time.Now().Unix(), 10)
		cmds := make([]*redis.IntCmd, len(dials))
		_, err := n.c.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
			for i, d := range dials {
				pipe.ZRemRangeByScore(ctx, n.liveKey(d), "-inf", "("+now)
				cmds[i] = pipe.ZCount(ctx, n.liveKey(d), now, "+inf")
			}
			return nil
		})
		if err != nil {
			n.c.failed("count", err)
			return
		}
		n.c.worked()
		m := make(map[string]clusterCount, len(dials))
		for i, d := range dials {
			m[d] = clusterCount{n: cmds[i].Val(), localAt: at[i]}
		}
		n.counts.Store(&m)
	}()
}

// clusterSessions returns the cluster's live sessions on dial as last
// read, and whether there is a reading.
func (n *redisNS) clusterSessions(dial string) (int64, bool) {
	m := n.counts.Load()
	if m == nil {
		return 0, false
	}
	c, ok := (*m)[dial]
	return c.n, ok
}

// clusterLoad is what balance_factor bounds under store redis: the
// cluster's live sessions on dial as the farm last read them, plus what
// this instance placed (or lost) since, which it knows exactly. Never
// less than local (Redis may have missed writes during an outage).
func (n *redisNS) clusterLoad(dial string, local int64) int64 {
	m := n.counts.Load()
	if m == nil {
		return local
	}
	c, ok := (*m)[dial]
	if !ok {
		return local
	}
	return max(local, c.n+local-c.localAt)
}

// startResync runs a write back in the background, one at a time: one
// asked for while another runs is run once more after it. from is the
// table second since which entries changed (0: all of them).
func (n *redisNS) startResync(reason string, from uint32) {
	if !n.resyncing.CompareAndSwap(false, true) {
		if from == 0 || n.againFrom.Load() == 0 {
			n.againFrom.Store(from)
		}
		n.again.Store(true)
		return
	}
	go func() {
		defer n.resyncing.Store(false)
		for range 2 {
			n.writeBack(reason, from)
			if !n.again.Swap(false) {
				return
			}
			from = n.againFrom.Swap(0)
		}
	}()
}

// backEntry is a live local entry to write back to Redis.
type backEntry struct {
	key   uint64 // as Redis knows it: without the table's scope
	dial  string
	alias bool
	ttl   time.Duration // how long Redis keeps it
}

// Write back pace: writeBackBatch entries per round trip, writeBackPause
// between batches, so that a large table never floods a Redis that just
// came back, nor this process's CPU.
const (
	writeBackBatch = 256
	writeBackPause = 10 * time.Millisecond
)

// writeBack writes the namespace's live local entries on its upstreams
// (main entries and aliases, each with the time it has left) that were
// touched since from (table seconds; 0: all), for the sessions learned
// while Redis was down, or all of them when Redis lost them. The table is
// process-wide: entries are told to be the namespace's by their upstream
// being one of its dials.
func (n *redisNS) writeBack(reason string, from uint32) {
	dp := n.dials.Load()
	if dp == nil {
		return
	}
	start := time.Now()
	ids := make(map[uint32]string, len(*dp))
	for _, d := range *dp {
		if rec := healthcheck.Lookup(d); rec != nil {
			ids[rec.ID] = d
		}
	}
	now := Now()
	scope := n.h.scope.Load()
	ttl := n.h.ttl
	q := writeBackQuantum(ttl)
	var entries []backEntry
	n.h.table.Export(now, func(k uint64, e Entry) {
		dial, ok := ids[e.Upstream()]
		// Touched since from: its expiry slid past from + ttl.
		if !ok || (from != 0 && e.Expires() < from+ttl) {
			return
		}
		entries = append(entries, backEntry{key: k ^ scope, dial: dial, alias: e.Alias(),
			ttl: time.Duration(e.Expires()-now+q) * time.Second})
	})
	written, present, err := n.writeEntries(entries)
	if len(entries) == 0 {
		return
	}
	fields := []zap.Field{zap.String("reason", reason), zap.String("namespace", n.ns), zap.Int("entries", len(entries)),
		zap.Int("written", written), zap.Int("already_in_redis", present), zap.Duration("took", time.Since(start))}
	if err != nil {
		n.c.logger.Warn("writing the live sessions back to redis stopped; it is tried again once redis answers",
			append(fields, zap.Error(err))...)
		return
	}
	n.c.logger.Info("wrote this instance's live sessions back to redis", fields...)
}

// writeEntries writes entries with SET NX, so that what another instance
// wrote meanwhile (a newer entry, or a move) wins, and counts the main
// entries it wrote in their dial's live set. It stops when Redis fails
// (the circuit then asks for another write back once Redis answers) or
// the client closes.
func (n *redisNS) writeEntries(entries []backEntry) (written, present int, err error) {
	ctx := n.c.ctx
	sets := make([]*redis.BoolCmd, writeBackBatch)
	for start := 0; start < len(entries); start += writeBackBatch {
		if err := ctx.Err(); err != nil {
			return written, present, err
		}
		if !n.c.usable() {
			return written, present, errors.New("redis is skipped (the circuit is open)")
		}
		batch := entries[start:min(start+writeBackBatch, len(entries))]
		_, err := n.c.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
			for i, e := range batch {
				sets[i] = pipe.SetNX(ctx, n.key(e.key), remoteValue(e.dial, e.alias), e.ttl)
			}
			return nil
		})
		if err != nil {
			n.c.failed("write back", err)
			return written, present, err
		}
		now := time.Now()
		live := 0
		for i, e := range batch {
			if !sets[i].Val() {
				present++
				continue
			}
			written++
			if !e.alias {
				live++
			}
		}
		if live > 0 {
			_, err = n.c.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
				for i, e := range batch {
					if sets[i].Val() && !e.alias {
						until := now.Add(e.ttl)
						pipe.ZAdd(ctx, n.liveKey(e.dial), redis.Z{Score: float64(until.Unix()), Member: strconv.FormatUint(e.key, 16)})
						// The set lives as long as its longest entry.
						pipe.ExpireNX(ctx, n.liveKey(e.dial), e.ttl+time.Second)
						pipe.ExpireGT(ctx, n.liveKey(e.dial), e.ttl+time.Second)
					}
				}
				return nil
			})
			if err != nil {
				n.c.failed("write back", err)
				return written, present, err
			}
		}
		n.c.worked()
		select {
		case <-ctx.Done():
		case <-time.After(writeBackPause):
		}
	}
	return written, present, nil
}
