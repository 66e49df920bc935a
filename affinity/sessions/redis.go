package sessions

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/caddy-affinity/caddy-affinity/hashring"
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

// clientKey tells clients apart: policies that reach the same Redis the
// same way (redisconn.Config.Identity: addresses, credentials, db, tls,
// timeout) with the same key prefix share one.
type clientKey struct {
	connection string
	prefix     string
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

	// releaseStates stops sharing lifecycle states through this client
	// (healthcheck.AcquireRedisStates), with the client.
	releaseStates func()

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

// redisKeyOf returns the client key of a config.
func redisKeyOf(c *Config) clientKey {
	k := clientKey{connection: c.RedisConn.Identity(), prefix: c.KeyPrefix}
	if k.prefix == "" {
		k.prefix = DefaultRedisKeyPrefix
	}
	return k
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
		client:     c.RedisConn.Client(),
		prefix:     k.prefix,
		channel:    k.prefix + ":changes",
		runKey:     k.prefix + ":run",
		nonce:      hex.EncodeToString(nb[:]),
		timeout:    c.RedisConn.CallTimeout(),
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
	// Lifecycle states (drain, maintenance, up) travel through the same
	// Redis and key prefix, so that every instance sharing the store sees
	// a state set on any of them, with no shared Caddy storage. It reads
	// the shared states once before it returns (bounded by the timeout).
	release, err := healthcheck.AcquireRedisStates(rc.client, k.connection, k.prefix)
	if err != nil {
		rc.close()
		return nil, fmt.Errorf("store redis: sharing upstream states: %v", err)
	}
	rc.releaseStates = release
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
		if c.releaseStates != nil {
			c.releaseStates()
		}
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
	n := newRedisNS(c, h, ns)
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

// runKeyTTL is how long the run id outlives the last instance that
// reads it: every instance renews it every second while it runs, so no
// running instance finds it gone, and nothing of the store's stays in
// Redis forever. An instance that starts after it went finds none and
// writes a new one, which is no loss: a first read is never a resync.
const runKeyTTL = 24 * time.Hour

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
		set = pipe.SetNX(ctx, c.runKey, c.nonce+"."+strconv.FormatInt(now.UnixNano(), 36), runKeyTTL)
		get = pipe.Get(ctx, c.runKey)
		// Kept while any instance runs; gone a day after the last one
		// stopped, like everything else the store wrote (an instance
		// that then finds none writes a new one and loses nothing:
		// there is nothing left to write back).
		pipe.Expire(ctx, c.runKey, runKeyTTL)
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

// The layout in Redis, per namespace (see docs/stores.md):
//
//   - entries in hash buckets, one hash per bucket and generation:
//     <key_prefix>:{<namespace>.<bits>.<bucket>}<generation>, field the
//     8-byte key hash, value 6 bytes: 's' (a session's main entry) or 'a'
//     (an alias) or 'r' (retired), 'n' (created in this generation) or
//     'b' (carried over from the one before), the upstream's 4-byte dial
//     code. Redis keeps such small hashes as listpacks: ~16 B an entry.
//     A generation is one session_ttl; a bucket's hash expires at the end
//     of the next generation. A live session is written (HSETNX) into
//     every generation it is active in, once: a lookup reads the current
//     generation, then the one before.
//   - counts apart from membership, one hash per generation:
//     <key_prefix>:{<namespace>}c<generation>, fields 'n'/'b' + dial
//     code: the main entries created in, and carried into, that
//     generation. The live sessions on a dial are n[g] + n[g-1] + b[g-1]:
//     every live session's last entry is in g or g-1, and one carried
//     into g is counted in g-1 already. Moves, deletions and retirements
//     take their session out of the counter it is in.
//
// A bucket's keys share a hash slot, and so do a namespace's counters;
// no command names keys of two slots (Redis Cluster).

// redisNS is one handle's namespace on a client.
type redisNS struct {
	c    *redisClient
	h    *Handle
	ns   string
	bits uint // buckets = 1 << bits
	tag  string

	// marks records the keys of the current generation whose TTL this
	// instance set, so that it is set once per key and generation.
	marks atomic.Pointer[genMarks]

	// codes maps dial codes to dials: the namespace's upstreams as the
	// policy's pools and refreshes name them.
	codes atomic.Pointer[map[uint32]string]
	mu    sync.Mutex // writers of codes

	// counts is the cluster's live sessions per dial, as the farm's
	// loop last read them, with this instance's own count at that
	// moment (see clusterLoad).
	counts   atomic.Pointer[map[string]clusterCount]
	counting atomic.Bool // a refresh is under way
	// dials are the upstreams of the last refresh, for write backs.
	dials atomic.Pointer[[]string]

	// pending are the counts not yet in Redis (see count).
	pendMu  sync.Mutex
	pending map[pendingCount]int64

	resyncing atomic.Bool // a write back is under way
	again     atomic.Bool // another was asked for meanwhile
	againFrom atomic.Uint32
	closed    atomic.Bool
}

// genMarks are the bucket TTLs set in one generation: a bit per bucket.
type genMarks struct {
	gen     uint32
	buckets []atomic.Uint64
}

// pendingCount names a field of generation g's counter hash: kind
// (kindNew or kindCarry) and dial code.
type pendingCount struct {
	g    uint32
	kind byte
	code uint32
}

// bucketBits returns log2 of the buckets of a namespace for max_sessions
// n: about 64 sessions a bucket at the bound (Redis keeps a hash of up to
// 128 entries as a listpack), 16 at least, 65536 at most. Instances of
// one site share max_sessions; the bits are in the keys, so that
// instances that do not cannot misread each other.
func bucketBits(n int64) uint {
	bits := uint(4)
	for bits < 16 && int64(1)<<bits*64 < n {
		bits++
	}
	return bits
}

func newRedisNS(c *redisClient, h *Handle, ns string) *redisNS {
	n := &redisNS{c: c, h: h, ns: ns, bits: bucketBits(h.maxSessions)}
	// The bucket count and the generation's length are in the keys:
	// instances that disagree on them (another max_sessions or
	// session_ttl) keep apart rather than misread each other.
	n.ns = ns + "." + strconv.FormatUint(uint64(h.ttl), 36)
	n.tag = c.prefix + ":{" + n.ns + "." + strconv.Itoa(int(n.bits)) + "."
	m := map[uint32]string{}
	n.codes.Store(&m)
	return n
}

// dialCode names a dial in 4 bytes.
func dialCode(dial string) uint32 { return uint32(hashring.HashStringSeed(dial, seedDialCode)) }

const seedDialCode = 11

// know records dials, so that codes read from Redis map back to them.
func (n *redisNS) know(dials []string) {
	m := *n.codes.Load()
	missing := false
	for _, d := range dials {
		if _, ok := m[dialCode(d)]; !ok {
			missing = true
			break
		}
	}
	if !missing {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	next := make(map[uint32]string, len(m)+len(dials))
	for k, v := range *n.codes.Load() {
		next[k] = v
	}
	for _, d := range dials {
		next[dialCode(d)] = d
	}
	n.codes.Store(&next)
}

// dialOf returns the dial of a code, or "".
func (n *redisNS) dialOf(code uint32) string {
	if d, ok := (*n.codes.Load())[code]; ok {
		return d
	}
	// A dial this namespace has not named yet: the process's upstreams.
	all := healthcheck.All()
	dials := make([]string, len(all))
	for i, u := range all {
		dials[i] = u.Dial
	}
	n.know(dials)
	return (*n.codes.Load())[code]
}

// gen returns the generation of table second t.
func (n *redisNS) gen(t uint32) uint32 { return t / max(n.h.ttl, 1) }

// genEnd returns the wall-clock end of generation g.
func (n *redisNS) genEnd(g uint32) time.Time {
	return time.Unix(Epoch+int64(g+1)*int64(max(n.h.ttl, 1)), 0)
}

// bucket returns the bucket of key.
func (n *redisNS) bucket(key uint64) uint32 {
	return uint32((key * 0x9e3779b97f4a7c15) >> (64 - n.bits))
}

func (n *redisNS) bucketKey(b, g uint32) string {
	return n.tag + strconv.FormatUint(uint64(b), 16) + "}" + strconv.FormatUint(uint64(g), 16)
}

func (n *redisNS) counterKey(g uint32) string {
	return n.c.prefix + ":{" + n.ns + "}c" + strconv.FormatUint(uint64(g), 16)
}

// field is an entry's field: the key hash, 8 bytes.
func field(key uint64) string {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], key)
	return string(b[:])
}

// Entry kinds and flags in values.
const (
	valMain    = 's'
	valAlias   = 'a'
	valRetired = 'r'
	kindNew    = 'n'
	kindCarry  = 'b'
)

func entryValue(flag, kind byte, code uint32) string {
	var b [6]byte
	b[0], b[1] = flag, kind
	binary.LittleEndian.PutUint32(b[2:], code)
	return string(b[:])
}

func parseValue(v string) (flag, kind byte, code uint32, ok bool) {
	if len(v) != 6 {
		return 0, 0, 0, false
	}
	return v[0], v[1], binary.LittleEndian.Uint32([]byte(v[2:])), true
}

// expireOnce queues the TTL of generation g's bucket b on pipe, after
// the write that may create it, the first time this instance writes it
// in g. A failed write forgets the marks (forgetMarks): its key may
// exist without a TTL.
func (n *redisNS) expireOnce(ctx context.Context, pipe redis.Pipeliner, g, b uint32) {
	m := n.marks.Load()
	if m == nil || m.gen != g {
		fresh := &genMarks{gen: g, buckets: make([]atomic.Uint64, (1<<n.bits+63)/64)}
		if n.marks.CompareAndSwap(m, fresh) {
			m = fresh
		} else {
			m = n.marks.Load()
		}
	}
	if m.gen != g {
		return
	}
	w, bit := &m.buckets[b/64], uint64(1)<<(b%64)
	if w.Load()&bit == 0 && w.Or(bit)&bit == 0 {
		// Entries outlive their generation by one: a session written
		// at its end lives a TTL into the next.
		pipe.ExpireAt(ctx, n.bucketKey(b, g), n.genEnd(g+1).Add(time.Second))
	}
}

// forgetMarks makes the next writes set their buckets' TTLs again: after
// a write that failed part way, or when Redis lost its data.
func (n *redisNS) forgetMarks() { n.marks.Store(nil) }

// count adds delta to the live sessions counted on a dial (code) in
// generation g. Counts reach Redis with the next flush (the farm's
// once-a-second refresh, or close), one HINCRBY per generation, kind and
// dial whatever the sessions: a session's count costs no command of its
// own, and no request waits for it.
func (n *redisNS) count(g uint32, kind byte, code uint32, delta int64) {
	n.pendMu.Lock()
	if n.pending == nil {
		n.pending = make(map[pendingCount]int64)
	}
	n.pending[pendingCount{g, kind, code}] += delta
	n.pendMu.Unlock()
}

// takeCounts returns the pending counts and forgets them.
func (n *redisNS) takeCounts() map[pendingCount]int64 {
	n.pendMu.Lock()
	defer n.pendMu.Unlock()
	p := n.pending
	n.pending = nil
	return p
}

// restoreCounts puts counts whose flush failed back: counted again with
// the next one (a flush that failed after Redis ran it counts them
// twice: a count too many balances away from a dial, one too few
// toward it; the counters are per generation, so either is gone in two).
func (n *redisNS) restoreCounts(p map[pendingCount]int64) {
	for k, d := range p {
		n.count(k.g, k.kind, k.code, d)
	}
}

// queueCounts queues p on pipe: an HINCRBY per field, then the TTL of
// each counter hash it names (the first HINCRBY creates the hash; its
// TTL follows in the same round trip).
func (n *redisNS) queueCounts(ctx context.Context, pipe redis.Pipeliner, p map[pendingCount]int64) {
	var gens []uint32
	for k, d := range p {
		if d == 0 {
			continue
		}
		pipe.HIncrBy(ctx, n.counterKey(k.g), string(rune(k.kind))+codeString(k.code), d)
		if !slices.Contains(gens, k.g) {
			gens = append(gens, k.g)
		}
	}
	for _, g := range gens {
		pipe.ExpireAt(ctx, n.counterKey(g), n.genEnd(g+2).Add(time.Second))
	}
}

// flushCounts writes the pending counts now (close: the next refresh
// would never come), within the client's timeout.
func (n *redisNS) flushCounts() {
	p := n.takeCounts()
	if len(p) == 0 || !n.c.usable() {
		return
	}
	ctx, cancel := context.WithTimeout(n.c.ctx, n.c.timeout)
	defer cancel()
	if _, err := n.c.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
		n.queueCounts(ctx, pipe, p)
		return nil
	}); err != nil {
		n.c.failed("count", err)
	}
}

func (n *redisNS) close() {
	if !n.closed.CompareAndSwap(false, true) {
		return
	}
	n.flushCounts()
	n.c.mu.Lock()
	delete(n.c.namespaces, n)
	n.c.mu.Unlock()
	n.c.release()
}

// within returns a context that ends at deadline; ok is false when
// Redis is skipped (the circuit is open) or the deadline has passed.
func (n *redisNS) within(deadline time.Time) (context.Context, context.CancelFunc, bool) {
	if !n.c.usable() {
		return nil, nil, false
	}
	return deadlineContext(deadline)
}

// found is an entry as read from Redis: in which generation (0: the
// current, 1: the one before), and its value.
type found struct {
	prev       bool
	flag, kind byte
	code       uint32
	ok         bool
}

// read reads keys' entries in the current generation g, then the missing
// ones in the one before: one round trip, two for a key last written in
// the previous generation.
func (n *redisNS) read(ctx context.Context, keys []uint64, g uint32) ([]found, error) {
	out := make([]found, len(keys))
	for pass := 0; pass < 2; pass++ {
		gen := g - uint32(pass)
		cmds := make([]*redis.StringCmd, len(keys))
		asked := false
		_, err := n.c.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
			for i, k := range keys {
				if out[i].ok {
					continue
				}
				cmds[i] = pipe.HGet(ctx, n.bucketKey(n.bucket(k), gen), field(k))
				asked = true
			}
			return nil
		})
		if !asked {
			break
		}
		if err != nil && !errors.Is(err, redis.Nil) {
			return nil, err
		}
		for i, cmd := range cmds {
			if cmd == nil {
				continue
			}
			if v, err := cmd.Result(); err == nil {
				if flag, kind, code, ok := parseValue(v); ok {
					out[i] = found{prev: pass == 1, flag: flag, kind: kind, code: code, ok: true}
				}
			}
		}
		if g == 0 {
			break
		}
	}
	return out, nil
}

// fetch returns what Redis holds for keys; nil when Redis is skipped,
// failed or the deadline passed.
func (n *redisNS) fetch(keys []uint64, deadline time.Time) []remoteEntry {
	ctx, cancel, ok := n.within(deadline)
	if !ok {
		return nil
	}
	defer cancel()
	got, err := n.read(ctx, keys, n.gen(Now()))
	if err != nil {
		n.c.failed("get", err)
		n.c.lookups.log(n.c.logger, "a redis lookup failed: a session this instance did not know may have been placed anew (counted in caddy_affinity_store_errors_total)",
			zap.Error(err))
		return nil
	}
	n.c.worked()
	out := make([]remoteEntry, len(keys))
	for i, f := range got {
		if !f.ok || f.flag == valRetired {
			continue
		}
		if dial := n.dialOf(f.code); dial != "" {
			out[i] = remoteEntry{dial: dial, alias: f.flag == valAlias, prev: f.prev, ok: true}
		}
	}
	return out
}

// record writes ws: new entries, carried-over and written-back ones with
// HSETNX (what another instance wrote meanwhile wins), in one round trip,
// and counts those it wrote (count: with the next flush). Moves read the
// entry first (rare: a failover).
func (n *redisNS) record(ws []remoteWrite, deadline time.Time) {
	ctx, cancel, ok := n.within(deadline)
	if !ok {
		return
	}
	defer cancel()
	g := n.gen(Now())
	sets := make([]*redis.BoolCmd, len(ws))
	moves := false
	_, err := n.c.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
		for i, w := range ws {
			if w.how == writeMove {
				moves = true
				continue
			}
			n.know([]string{w.dial})
			flag := byte(valMain)
			if w.alias {
				flag = valAlias
			}
			b := n.bucket(w.key)
			sets[i] = pipe.HSetNX(ctx, n.bucketKey(b, g), field(w.key), entryValue(flag, w.kind(), dialCode(w.dial)))
			n.expireOnce(ctx, pipe, g, b)
		}
		return nil
	})
	if err != nil {
		n.forgetMarks()
		n.c.failed("set", err)
		return
	}
	n.c.worked()
	// A main entry is counted by the instance whose write won: instances
	// that share a session each carry it at their first request of a
	// generation, and a write back mostly finds the entry there.
	for i, w := range ws {
		if sets[i] != nil && !w.alias && sets[i].Val() {
			n.count(g, w.kind(), dialCode(w.dial), 1)
		}
	}
	if moves {
		for _, w := range ws {
			if w.how == writeMove {
				n.change('m', w.key, w, ctx)
			}
		}
	}
}

// kind is the entry kind a write records: carried over (a slide) or
// new in its generation (a new entry, a write back).
func (w remoteWrite) kind() byte {
	if w.how == writeSlide {
		return kindCarry
	}
	return kindNew
}

func codeString(code uint32) string {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], code)
	return string(b[:])
}

// uncount takes a session whose entries are cur (in generation g) and
// prev (in g-1) out of the counts: it is counted in the counter of its
// last entry in g-1 (n or b) if it has one there, or as new in g; and
// one carried into g counts in g's b from g+1 on.
func (n *redisNS) uncount(g uint32, cur, prev found) {
	if cur.ok && cur.flag == valMain {
		n.count(g, cur.kind, cur.code, -1)
	}
	if prev.ok && prev.flag == valMain && (!cur.ok || cur.kind == kindCarry) {
		n.count(g-1, prev.kind, prev.code, -1)
	}
}

// change applies a move ('m': w is the new entry), a retirement ('r') or
// a deletion ('d') of key: it reads the key's entries, takes the session
// out of the counts, writes the new entry (a move: counted as new on its
// dial), and publishes the change, so that instances that know the key
// follow.
func (n *redisNS) change(op byte, key uint64, w remoteWrite, ctx context.Context) {
	g := n.gen(Now())
	var cur, prev found
	if g > 0 {
		cmds := make([]*redis.StringCmd, 2)
		b := n.bucket(key)
		_, err := n.c.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
			cmds[0] = pipe.HGet(ctx, n.bucketKey(b, g), field(key))
			cmds[1] = pipe.HGet(ctx, n.bucketKey(b, g-1), field(key))
			return nil
		})
		if err != nil && !errors.Is(err, redis.Nil) {
			n.c.failed("change", err)
			return
		}
		for i, f := range []*found{&cur, &prev} {
			if v, err := cmds[i].Result(); err == nil {
				f.flag, f.kind, f.code, f.ok = parseValue(v)
			}
		}
	}
	b := n.bucket(key)
	payload := string(op) + " " + n.c.nonce + " " + n.ns + " " + strconv.FormatUint(key, 16)
	_, err := n.c.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
		switch op {
		case 'm':
			flag := byte(valMain)
			if w.alias {
				flag = valAlias
			}
			pipe.HSet(ctx, n.bucketKey(b, g), field(key), entryValue(flag, kindNew, dialCode(w.dial)))
			if prev.ok {
				pipe.HDel(ctx, n.bucketKey(b, g-1), field(key))
			}
			n.expireOnce(ctx, pipe, g, b)
			payload += " " + remoteValue(w.dial, w.alias)
		case 'r':
			// Kept, marked: instances that know it keep it for the
			// grace (told by the message); one that does not, misses.
			if cur.ok {
				pipe.HSet(ctx, n.bucketKey(b, g), field(key), entryValue(valRetired, cur.kind, cur.code))
			}
			if prev.ok {
				pipe.HSet(ctx, n.bucketKey(b, g-1), field(key), entryValue(valRetired, prev.kind, prev.code))
			}
		case 'd':
			pipe.HDel(ctx, n.bucketKey(b, g), field(key))
			if g > 0 {
				pipe.HDel(ctx, n.bucketKey(b, g-1), field(key))
			}
		}
		pipe.Publish(ctx, n.c.channel, payload)
		return nil
	})
	if err != nil {
		n.forgetMarks()
		n.c.failed("change", err)
		return
	}
	n.c.worked()
	n.uncount(g, cur, prev)
	if op == 'm' && !w.alias {
		n.count(g, kindNew, dialCode(w.dial), 1)
	}
}

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

// retire makes key a retired id here and on every instance.
func (n *redisNS) retire(key uint64, _ string, deadline time.Time) {
	n.changeWithin('r', key, deadline)
}

// forget deletes key, here and on every instance.
func (n *redisNS) forget(key uint64, _ string, deadline time.Time) {
	n.changeWithin('d', key, deadline)
}

func (n *redisNS) changeWithin(op byte, key uint64, deadline time.Time) {
	ctx, cancel, ok := n.within(deadline)
	if !ok {
		return
	}
	defer cancel()
	n.change(op, key, remoteWrite{}, ctx)
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
		if old.names() != up {
			// Stored: Redis has it.
			table.Put(k, up, now, old.Expires()-now)
			table.Establish(k, now)
			table.MarkStored(k, now)
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

// refresh writes this instance's pending counts and reads the cluster's
// live sessions on dials from the counters of the current and the
// previous generation, in one round trip (two reads, whatever the
// sessions), in the background: the farm's loop calls it every second
// and never waits for Redis. The client then checks Redis's run.
func (n *redisNS) refresh(dials []string) {
	if len(dials) > 0 {
		d := append([]string(nil), dials...)
		n.dials.Store(&d)
		n.know(dials)
	}
	if !n.c.usable() || !n.counting.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer n.counting.Store(false)
		n.c.checkRun(false)
		// This instance's counts before Redis's: a session placed in
		// between is counted in both, once too many, never missed.
		at := make([]int64, len(dials))
		for i, d := range dials {
			if rec := healthcheck.Lookup(d); rec != nil {
				at[i] = max(0, n.h.table.LiveCount(rec.ID))
			}
		}
		pending := n.takeCounts()
		if len(dials) == 0 && len(pending) == 0 {
			return
		}
		ctx, cancel := context.WithTimeout(n.c.ctx, n.c.timeout)
		defer cancel()
		g := n.gen(Now())
		var cur, prev *redis.MapStringStringCmd
		_, err := n.c.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
			n.queueCounts(ctx, pipe, pending)
			if len(dials) > 0 {
				cur = pipe.HGetAll(ctx, n.counterKey(g))
				prev = pipe.HGetAll(ctx, n.counterKey(g-1))
			}
			return nil
		})
		if err != nil {
			n.restoreCounts(pending)
			n.c.failed("count", err)
			return
		}
		n.c.worked()
		if len(dials) == 0 {
			return
		}
		num := func(m map[string]string, kind byte, code string) int64 {
			v, _ := strconv.ParseInt(m[string(rune(kind))+code], 10, 64)
			return v
		}
		m := make(map[string]clusterCount, len(dials))
		for i, d := range dials {
			code := codeString(dialCode(d))
			live := num(cur.Val(), kindNew, code) + num(prev.Val(), kindNew, code) + num(prev.Val(), kindCarry, code)
			m[d] = clusterCount{n: max(0, live), localAt: at[i]}
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

// serves reports whether dial was among the upstreams of the last
// refresh.
func (n *redisNS) serves(dial string) bool {
	d := n.dials.Load()
	return d != nil && slices.Contains(*d, dial)
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
	// Redis may have lost the keys whose TTL this instance set in this
	// generation (flushed, restarted): the write back sets them again,
	// or they would live forever.
	n.forgetMarks()
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

// Write back pace: writeBackBatch entries per round trip, writeBackPause
// between batches, so that a large table never floods a Redis that just
// came back, nor this process's CPU.
const (
	writeBackBatch = 256
	writeBackPause = 10 * time.Millisecond
)

// expirePrevious sets the TTL of the previous generation's buckets of
// ws, after Redis lost its data: a request between the loss and its
// discovery (up to a second) may have written such a bucket anew, and
// this instance's marks said its TTL was set. The write back itself
// writes into the current generation, whose marks startResync forgot.
func (n *redisNS) expirePrevious(ws []remoteWrite) {
	g := n.gen(Now())
	if g == 0 {
		return
	}
	var buckets []uint32
	seen := make(map[uint32]bool)
	for _, w := range ws {
		if b := n.bucket(w.key); !seen[b] {
			seen[b] = true
			buckets = append(buckets, b)
		}
	}
	for i := 0; i < len(buckets); i += writeBackBatch {
		ctx, cancel := context.WithTimeout(n.c.ctx, n.c.timeout)
		_, err := n.c.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
			for _, b := range buckets[i:min(i+writeBackBatch, len(buckets))] {
				pipe.ExpireAt(ctx, n.bucketKey(b, g-1), n.genEnd(g).Add(time.Second))
			}
			return nil
		})
		cancel()
		if err != nil {
			n.c.failed("expire", err)
			return
		}
	}
}

// writeBack writes the namespace's live local entries on its upstreams
// (main entries and aliases) that were touched since from (table
// seconds; 0: all), for the sessions learned while Redis was down, or all
// of them when Redis lost them: into the current generation, as new
// entries where Redis has none (HSETNX: what another instance wrote
// meanwhile wins), counted. The table is process-wide: entries are told
// to be the namespace's by their upstream being one of its dials. It
// stops when Redis fails (the circuit then asks again once Redis
// answers) or the client closes.
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
	var ws []remoteWrite
	n.h.table.Export(now, func(k uint64, e Entry) {
		dial, ok := ids[e.Upstream()]
		// Touched since from: its expiry slid past from + ttl.
		if !ok || (from != 0 && e.Expires() < from+ttl) {
			return
		}
		ws = append(ws, remoteWrite{key: k ^ scope, dial: dial, alias: e.Alias(), how: writeBack})
	})
	var err error
	for i := 0; i < len(ws) && err == nil; i += writeBackBatch {
		if err = n.c.ctx.Err(); err != nil {
			break
		}
		if !n.c.usable() {
			err = errors.New("redis is skipped (the circuit is open)")
			break
		}
		fails := n.c.fails.Load()
		n.record(ws[i:min(i+writeBackBatch, len(ws))], time.Now().Add(n.c.timeout))
		if n.c.fails.Load() > fails {
			err = errors.New("redis failed")
		}
		select {
		case <-n.c.ctx.Done():
		case <-time.After(writeBackPause):
		}
	}
	if len(ws) == 0 {
		return
	}
	if from == 0 && err == nil {
		n.expirePrevious(ws)
	}
	fields := []zap.Field{zap.String("reason", reason), zap.String("namespace", n.ns), zap.Int("entries", len(ws)),
		zap.Duration("took", time.Since(start))}
	if err != nil {
		n.c.logger.Warn("writing the live sessions back to redis stopped; it is tried again once redis answers",
			append(fields, zap.Error(err))...)
		return
	}
	n.c.logger.Info("wrote this instance's live sessions back to redis", fields...)
}
