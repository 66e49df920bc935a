package affinity

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

	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// `store redis`: a Redis server shared by every instance that uses it,
// behind the process's table, which stays the hot path:
//
//   - a key the local table knows costs no round trip;
//   - a key it does not know costs one (MGET of the request's keys,
//     bounded by the timeout), and what Redis names is kept locally;
//   - new entries, moves (a session that failed over) and learned ids are
//     written (SET with the session TTL plus a quarter) before the
//     response leaves; a live entry's sliding expiry is written back only
//     when it crosses a quarter of the TTL: at most about four writes per
//     session per session_ttl;
//   - moves, retired and deleted ids are also published, so that the
//     instances that know the key locally follow at once (an instance
//     that does not know it asks Redis when it sees it).
//
// Keys in Redis are the key hashes without the policy's scope (which
// depends on the instance's listeners): instances share entries by
// key_prefix. Upstreams are named by dial address, never by the
// process-local IDs.
//
// When Redis fails or is slow, every operation gives up within the
// timeout, the local table decides alone, and Redis is skipped for a
// second (a circuit), so that a dead server costs one timeout per second,
// not one per request. The outage is logged once and every error counted
// in caddy_affinity_store_errors_total.

// redisSkip is how long Redis is skipped after redisTrip errors with no
// success for redisQuiet. Not after one error: a few slow answers in a
// burst (fresh connections, a busy machine) while others succeed must
// not cut a second of sessions off the store, which breaks every
// session an instance meets for the first time meanwhile; a dead or hung
// server fails three operations, then is skipped.
const (
	redisSkip  = time.Second
	redisTrip  = 3
	redisQuiet = 250 * time.Millisecond
)

// redisStore is one policy's connection to Redis.
type redisStore struct {
	client  *redis.Client
	prefix  string // of entry keys: <key_prefix>:s:
	channel string // of published changes: <key_prefix>:changes
	nonce   string // tells this instance's messages from others'
	logger  *zap.Logger

	skipUntil atomic.Int64 // unix nanoseconds: Redis is skipped until then
	fails     atomic.Int32 // errors since the last success
	lastOK    atomic.Int64 // unix nanoseconds of the last success
	down      atomic.Bool  // the outage was logged

	// counts is the cluster's live sessions per dial, as the farm's
	// loop last read them (refreshCounts), with this instance's own
	// count at that moment (see clusterLoad).
	counts   atomic.Pointer[map[string]clusterCount]
	counting atomic.Bool // a refresh is under way

	// Writing back after an outage (see writeBack). runKey holds the
	// id of Redis's current run, written (SET NX) by the first instance
	// that finds none: a Redis restarted empty, or flushed, has none,
	// so an instance that reads another id than the last one it read
	// knows that Redis lost what it had. run is that last id, touched
	// only by the refresh goroutine (one at a time: counting).
	runKey string
	run    string
	// missed is set when the circuit opens: writes were skipped from
	// then on, so the next refresh that works writes back.
	missed    atomic.Bool
	resyncing atomic.Bool // a write back is under way
	again     atomic.Bool // another was asked for meanwhile

	ctx    context.Context // cancelled by close: a write back stops
	sub    *redis.PubSub
	cancel context.CancelFunc
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

// remoteEntry is what Redis holds for one key.
type remoteEntry struct {
	dial  string
	alias bool
	ok    bool
}

var storeErrors = struct {
	once sync.Once
	c    prometheus.Counter
}{}

// registerStoreMetrics registers caddy_affinity_store_errors_total into
// a config's registry (each config load has a fresh one; the counter
// goes on across reloads).
func registerStoreMetrics(reg *prometheus.Registry) error {
	storeErrors.once.Do(func() {
		storeErrors.c = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "affinity", Name: "store_errors_total",
			Help: "Operations of the shared session store (store redis) that failed or timed out; the local session table decided alone.",
		})
	})
	if reg == nil {
		return nil
	}
	if err := reg.Register(storeErrors.c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			return err
		}
	}
	return nil
}

// newRedisStore connects (lazily: nothing here waits for Redis, so that a
// start or reload never hangs on it) and subscribes to the changes other
// instances publish, which apply calls.
func newRedisStore(c *StoreConfig, logger *zap.Logger, apply func(op byte, key uint64, e remoteEntry)) (*redisStore, error) {
	repl := caddy.NewReplacer()
	addr := repl.ReplaceKnown(c.Address, "")
	timeout := time.Duration(c.Timeout)
	if timeout == 0 {
		timeout = time.Duration(DefaultRedisTimeout)
	}
	opts := &redis.Options{
		Addr:     addr,
		Username: repl.ReplaceKnown(c.Username, ""),
		Password: repl.ReplaceKnown(c.Password, ""),
		DB:       c.DB,
		// Every wait is bounded by the timeout, and a failed command is
		// not retried: the local table answers instead.
		DialTimeout:  timeout,
		ReadTimeout:  timeout,
		WriteTimeout: timeout,
		PoolTimeout:  timeout,
		MaxRetries:   -1,
		// One dial attempt: the client's default of five, 100ms apart,
		// would hold a request far past the timeout while Redis is down.
		DialerRetries: 1,
		// No CLIENT SETINFO on every new connection.
		DisableIdentity: true,
		// Connections dialled ahead, in the background, so that a
		// burst of requests seldom waits for a dial.
		MinIdleConns: 8,
	}
	if c.TLS {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			host = addr
		}
		opts.TLSConfig = &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	}
	prefix := c.KeyPrefix
	if prefix == "" {
		prefix = DefaultRedisKeyPrefix
	}
	// go-redis logs through a process-wide logger to stderr, a line per
	// failed dial: send it to Caddy's log at debug level, since the
	// store logs an outage once itself.
	redisLogOnce.Do(func() { redis.SetLogger(redisLogger{caddy.Log().Named("affinity.store.redis")}) })
	var nb [8]byte
	_, _ = rand.Read(nb[:])
	s := &redisStore{
		client:  redis.NewClient(opts),
		prefix:  prefix + ":s:",
		channel: prefix + ":changes",
		runKey:  prefix + ":run",
		nonce:   hex.EncodeToString(nb[:]),
		logger:  logger,
		done:    make(chan struct{}),
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.ctx, s.cancel = ctx, cancel
	s.sub = s.client.Subscribe(ctx, s.channel)
	go s.listen(apply)
	// Open a connection ahead of the first request, and read Redis's
	// run id (writing one if there is none), without waiting for either
	// (a start or reload never waits for Redis). Read now, before this
	// instance writes: a first instance that finds none at its first
	// refresh, a second later, would take its own writes for what a
	// restarted Redis lost, and write its sessions again for nothing.
	go func() {
		if !s.counting.CompareAndSwap(false, true) {
			return // a refresh is reading it already
		}
		defer s.counting.Store(false)
		run, _, err := s.readRun(ctx)
		if err == nil {
			s.run = run
		}
	}()
	return s, nil
}

// close stops the subscriber and the connections; it never waits for
// Redis.
func (s *redisStore) close() {
	s.once.Do(func() {
		s.cancel()
		_ = s.sub.Close()
		// The subscriber ends when its channel closes, at once; the
		// bound only guards a stop or reload against a client bug.
		select {
		case <-s.done:
		case <-time.After(time.Second):
			s.logger.Warn("the redis store's subscriber did not stop within 1s; going on")
		}
		_ = s.client.Close()
	})
}

// listen applies the changes other instances publish until close.
func (s *redisStore) listen(apply func(op byte, key uint64, e remoteEntry)) {
	defer close(s.done)
	for msg := range s.sub.Channel() {
		// "<op> <nonce> <key hex> [<a|s>|<dial>]"
		f := strings.SplitN(msg.Payload, " ", 4)
		if len(f) < 3 || len(f[0]) != 1 || f[1] == s.nonce {
			continue
		}
		key, err := strconv.ParseUint(f[2], 16, 64)
		if err != nil {
			continue
		}
		var e remoteEntry
		if len(f) == 4 {
			if e, err = parseRemote(f[3]); err != nil {
				continue
			}
		}
		apply(f[0][0], key, e)
	}
}

// usable reports whether Redis is asked now (the circuit is closed).
func (s *redisStore) usable() bool {
	return time.Now().UnixNano() >= s.skipUntil.Load()
}

// failed counts an error; the redisTrip-th in a row skips Redis for a
// moment and logs the outage, once.
func (s *redisStore) failed(op string, err error) {
	storeErrors.c.Inc()
	now := time.Now()
	if s.fails.Add(1) < redisTrip || now.UnixNano()-s.lastOK.Load() < int64(redisQuiet) {
		return
	}
	s.skipUntil.Store(now.Add(redisSkip).UnixNano())
	// Writes are skipped from now on: the sessions learned meanwhile are
	// written back once Redis answers again.
	s.missed.Store(true)
	if s.down.CompareAndSwap(false, true) {
		s.logger.Warn("the redis session store failed; the local session table decides alone, and redis is tried again every second (logged once per outage; counted in caddy_affinity_store_errors_total)",
			zap.String("op", op), zap.Error(err))
	}
}

// worked notes a success, ending a logged outage.
func (s *redisStore) worked() {
	s.lastOK.Store(time.Now().UnixNano())
	if s.fails.Load() != 0 {
		s.fails.Store(0)
		s.skipUntil.Store(0) // it answers: stop skipping it
	}
	if s.down.Load() && s.down.CompareAndSwap(true, false) {
		s.logger.Info("the redis session store answers again")
	}
}

func (s *redisStore) key(k uint64) string { return s.prefix + strconv.FormatUint(k, 16) }

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

// fetch returns what Redis holds for keys, in one round trip; nil when
// Redis is skipped or failed.
func (s *redisStore) fetch(keys []uint64) []remoteEntry {
	if !s.usable() {
		return nil
	}
	names := make([]string, len(keys))
	for i, k := range keys {
		names[i] = s.key(k)
	}
	vals, err := s.client.MGet(context.Background(), names...).Result()
	if err != nil {
		s.failed("get", err)
		return nil
	}
	s.worked()
	out := make([]remoteEntry, len(keys))
	for i, v := range vals {
		if str, ok := v.(string); ok {
			out[i], _ = parseRemote(str)
		}
	}
	return out
}

// remoteTTL is how long Redis keeps an entry written with a session TTL
// of ttl seconds: a quarter more, since the sliding expiry is written
// back only when it crosses a quarter (see Policy.rememberRemote).
func remoteTTL(ttl uint32) time.Duration {
	return time.Duration(ttl+writeBackQuantum(ttl)) * time.Second
}

// writeBackQuantum is the step of sliding expiries written to Redis.
func writeBackQuantum(ttl uint32) uint32 { return max(ttl/4, 1) }

// Ways record writes an entry (remoteWrite.how).
const (
	// writeNew: a key this instance did not know; another instance may
	// have recorded it while this one failed to read it, so an entry
	// already in Redis is kept (SET NX).
	writeNew = iota
	// writeSlide: a live entry's expiry written back.
	writeSlide
	// writeMove: the session moved (failover): overwrite and publish.
	writeMove
)

// remoteWrite is one entry record writes: key -> dial (how: writeNew,
// writeSlide or writeMove; from is the dial a move leaves).
type remoteWrite struct {
	key        uint64
	dial, from string
	alias      bool
	how        int
}

// record writes the entries of ws for ttl seconds, in one round trip
// (a request's keys together); a move is published, so that instances
// knowing the key follow. A session's main entry is also counted in the
// dial's set of live sessions (see liveKey).
func (s *redisStore) record(ws []remoteWrite, ttl uint32) {
	if !s.usable() {
		return
	}
	ctx := context.Background()
	_, err := s.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
		for _, w := range ws {
			s.queueWrite(ctx, pipe, w, ttl)
		}
		return nil
	})
	if err != nil {
		s.failed("set", err)
		return
	}
	s.worked()
}

// queueWrite queues the commands of one write on pipe.
func (s *redisStore) queueWrite(ctx context.Context, pipe redis.Pipeliner, w remoteWrite, ttl uint32) {
	v := remoteValue(w.dial, w.alias)
	k := s.key(w.key)
	member := strconv.FormatUint(w.key, 16)
	switch w.how {
	case writeNew:
		pipe.SetNX(ctx, k, v, remoteTTL(ttl))
	default:
		pipe.Set(ctx, k, v, remoteTTL(ttl))
	}
	if !w.alias {
		// Scored by when Redis lets the entry go, which is never
		// before the session's local expiry: the count errs on the
		// side of more sessions, so `drained` is never early.
		until := float64(time.Now().Add(remoteTTL(ttl)).Unix())
		pipe.ZAdd(ctx, s.liveKey(w.dial), redis.Z{Score: until, Member: member})
	}
	if w.how == writeMove {
		// Not counted where it was: it left that dial, or it became
		// an alias there (a session first seen by its client IP,
		// then by its app's cookie), which is no session of its own.
		if w.from != "" && (w.from != w.dial || w.alias) {
			pipe.ZRem(ctx, s.liveKey(w.from), member)
		}
		pipe.Publish(ctx, s.channel, "m "+s.nonce+" "+member+" "+v)
	}
}

// retire makes key expire within grace seconds at the latest, here and
// on every instance; dial, if known, is where it was counted.
func (s *redisStore) retire(key uint64, dial string, grace uint32) {
	s.change('r', key, func(pipe redis.Pipeliner) {
		pipe.ExpireLT(context.Background(), s.key(key), time.Duration(grace)*time.Second)
		if dial != "" {
			until := float64(time.Now().Add(time.Duration(grace) * time.Second).Unix())
			pipe.ZAddArgs(context.Background(), s.liveKey(dial), redis.ZAddArgs{XX: true, LT: true,
				Members: []redis.Z{{Score: until, Member: strconv.FormatUint(key, 16)}}})
		}
	})
}

// remove forgets key, here and on every instance; dial, if known, is
// where it was counted.
func (s *redisStore) remove(key uint64, dial string) {
	s.change('d', key, func(pipe redis.Pipeliner) {
		pipe.Del(context.Background(), s.key(key))
		if dial != "" {
			pipe.ZRem(context.Background(), s.liveKey(dial), strconv.FormatUint(key, 16))
		}
	})
}

// liveKey is the sorted set of the sessions counted on dial: members are
// key hashes, scores the unix second Redis lets each go.
func (s *redisStore) liveKey(dial string) string { return s.prefix[:len(s.prefix)-2] + "live:" + dial }

// refreshCounts reads the cluster's live sessions on dials (dropping
// the expired ones first), in one round trip, in the background: the
// farm's loop calls it (through Policy.refreshRemote) every second and
// never waits for Redis. The same round trip reads Redis's run id (see
// runKey); when Redis lost its data, or when the circuit opened since
// the last refresh that worked, resync is started (nil: not asked).
func (s *redisStore) refreshCounts(dials []string) { s.refresh(dials, nil, nil) }

// clusterCount is the cluster's live sessions on a dial as last read,
// and this instance's own (its table's exact count) just before.
type clusterCount struct{ n, localAt int64 }

// refresh is refreshCounts; local, if not nil, returns this instance's
// own live sessions on a dial.
func (s *redisStore) refresh(dials []string, local func(dial string) int64, resync func(reason string)) {
	if !s.usable() || !s.counting.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer s.counting.Store(false)
		// This instance's counts before Redis's: a session placed in
		// between is counted in both, once too many, never missed.
		at := make([]int64, len(dials))
		if local != nil {
			for i, d := range dials {
				at[i] = local(d)
			}
		}
		ctx := context.Background()
		now := strconv.FormatInt(time.Now().Unix(), 10)
		cmds := make([]*redis.IntCmd, len(dials))
		var setRun *redis.BoolCmd
		var getRun *redis.StringCmd
		_, err := s.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
			for i, d := range dials {
				pipe.ZRemRangeByScore(ctx, s.liveKey(d), "-inf", "("+now)
				cmds[i] = pipe.ZCount(ctx, s.liveKey(d), now, "+inf")
			}
			setRun, getRun = s.runCommands(ctx, pipe)
			return nil
		})
		if err != nil {
			s.failed("count", err)
			return
		}
		s.worked()
		m := make(map[string]clusterCount, len(dials))
		for i, d := range dials {
			m[d] = clusterCount{n: cmds[i].Val(), localAt: at[i]}
		}
		s.counts.Store(&m)
		run := getRun.Val()
		// Lost: another run id than the last one read, or none before
		// this one and this instance wrote it (the first to find
		// Redis empty).
		lost := (s.run != "" && run != s.run) || (s.run == "" && setRun.Val())
		s.run = run
		if resync == nil {
			return
		}
		if missed := s.missed.Swap(false); lost || missed {
			reason := "the circuit was open"
			if lost {
				reason = "redis lost its data (restarted or flushed)"
			}
			s.startResync(reason, resync)
		}
	}()
}

// runCommands queues the read of Redis's run id, written first if there
// is none (SET NX), on pipe.
func (s *redisStore) runCommands(ctx context.Context, pipe redis.Pipeliner) (*redis.BoolCmd, *redis.StringCmd) {
	// A fresh candidate each time: an instance whose own id was the run
	// id before a restart must not find it again.
	candidate := s.nonce + "." + strconv.FormatInt(time.Now().UnixNano(), 36)
	return pipe.SetNX(ctx, s.runKey, candidate, 0), pipe.Get(ctx, s.runKey)
}

// readRun reads Redis's run id (see runKey) in one round trip, writing
// one first if there is none; wrote says this call wrote it.
func (s *redisStore) readRun(ctx context.Context) (run string, wrote bool, err error) {
	var set *redis.BoolCmd
	var get *redis.StringCmd
	_, err = s.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
		set, get = s.runCommands(ctx, pipe)
		return nil
	})
	if err != nil {
		return "", false, err
	}
	return get.Val(), set.Val(), nil
}

// startResync runs resync in the background, one at a time: one asked
// for while another runs is run once more after it.
func (s *redisStore) startResync(reason string, resync func(reason string)) {
	if !s.resyncing.CompareAndSwap(false, true) {
		s.again.Store(true)
		return
	}
	go func() {
		defer s.resyncing.Store(false)
		// Bounded: a write back asked for during another is run once
		// more; an outage during this one opens the circuit, which
		// asks again once Redis answers.
		for range 2 {
			resync(reason)
			if !s.again.Swap(false) {
				return
			}
		}
	}()
}

// backEntry is a live local entry to write back to Redis.
type backEntry struct {
	key   uint64 // as Redis knows it: without the policy's scope
	dial  string
	alias bool
	ttl   time.Duration // how long Redis keeps it
}

// Write back pace: writeBackBatch entries per round trip (two: SET NX,
// then the live-set ZADDs of those written), writeBackPause between
// batches, so that a large table (a million sessions: about a minute)
// never floods a Redis that just came back, nor this process's CPU.
const (
	writeBackBatch = 256
	writeBackPause = 10 * time.Millisecond
)

// writeBack writes entries with SET NX, so that what another instance
// wrote meanwhile (a newer entry, or a move) wins, and counts the main
// entries it wrote in their dial's live set. It stops when Redis fails
// (the circuit then asks for another write back once Redis answers) or
// the store closes. It returns how many entries it wrote and how many
// Redis had already.
func (s *redisStore) writeBack(entries []backEntry) (written, present int, err error) {
	ctx := s.ctx
	sets := make([]*redis.BoolCmd, writeBackBatch)
	for start := 0; start < len(entries); start += writeBackBatch {
		if err := ctx.Err(); err != nil {
			return written, present, err
		}
		if !s.usable() {
			return written, present, errors.New("redis is skipped (the circuit is open)")
		}
		batch := entries[start:min(start+writeBackBatch, len(entries))]
		_, err := s.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
			for i, e := range batch {
				sets[i] = pipe.SetNX(ctx, s.key(e.key), remoteValue(e.dial, e.alias), e.ttl)
			}
			return nil
		})
		if err != nil {
			s.failed("write back", err)
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
			_, err = s.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
				for i, e := range batch {
					if sets[i].Val() && !e.alias {
						pipe.ZAdd(ctx, s.liveKey(e.dial), redis.Z{
							Score:  float64(now.Add(e.ttl).Unix()),
							Member: strconv.FormatUint(e.key, 16),
						})
					}
				}
				return nil
			})
			if err != nil {
				s.failed("write back", err)
				return written, present, err
			}
		}
		s.worked()
		select {
		case <-ctx.Done():
		case <-time.After(writeBackPause):
		}
	}
	return written, present, nil
}

// refreshRemote is the farm's once-a-second call under store redis: the
// cluster's counts on dials (the policy's upstreams), and a write back of
// the policy's live sessions when Redis lost them or missed writes.
func (p *Policy) refreshRemote(dials []string) {
	p.remote.refresh(dials, p.localSessions, func(reason string) { p.writeBackRemote(dials, reason) })
}

// localSessions returns the table's live sessions on dial (exact).
func (p *Policy) localSessions(dial string) int64 {
	rec := healthcheck.Lookup(dial)
	if rec == nil {
		return 0
	}
	return max(0, p.table.LiveCount(rec.ID))
}

// writeBackRemote writes the policy's live local entries on dials to
// Redis (main entries and aliases, each with the time it has left), for
// the sessions learned while Redis was down or that Redis lost when it
// restarted. The table is process-wide: entries are told to be the
// policy's by their upstream being one of its dials. Two sites of one
// process on the same upstreams, both with store redis, thus also write
// each other's entries, under keys no request asks for (the scopes
// differ), which count in the live sets until their TTL: the table
// does not say which policy wrote an entry.
func (p *Policy) writeBackRemote(dials []string, reason string) {
	start := time.Now()
	ids := make(map[uint32]string, len(dials))
	for _, d := range dials {
		if rec := healthcheck.Lookup(d); rec != nil {
			ids[rec.ID] = d
		}
	}
	now := sessions.Now()
	scope := p.scope.Load()
	q := writeBackQuantum(p.ttl)
	var entries []backEntry
	p.table.Export(now, func(k uint64, e sessions.Entry) {
		dial, ok := ids[e.Upstream()]
		if !ok {
			return
		}
		// Redis's TTL is a quarter more than the local one, as record
		// writes it.
		entries = append(entries, backEntry{key: k ^ scope, dial: dial, alias: e.Alias(),
			ttl: time.Duration(e.Expires()-now+q) * time.Second})
	})
	written, present, err := p.remote.writeBack(entries)
	if len(entries) == 0 {
		return // a first instance meeting a fresh Redis: nothing to say
	}
	fields := []zap.Field{zap.String("reason", reason), zap.Int("entries", len(entries)), zap.Int("written", written),
		zap.Int("already_in_redis", present), zap.Duration("took", time.Since(start))}
	if err != nil {
		p.remote.logger.Warn("writing the live sessions back to redis stopped; it is tried again once redis answers",
			append(fields, zap.Error(err))...)
		return
	}
	p.remote.logger.Info("wrote this instance's live sessions back to redis", fields...)
}

// clusterSessions returns the cluster's live sessions on dial as last
// read, and whether there is a reading.
func (s *redisStore) clusterSessions(dial string) (int64, bool) {
	m := s.counts.Load()
	if m == nil {
		return 0, false
	}
	c, ok := (*m)[dial]
	return c.n, ok
}

// clusterLoad is what balance_factor bounds under store redis: the
// cluster's live sessions on dial, from local, this instance's exact
// count now. The cluster's count is as the farm last read it (every
// second: it is a second and a Redis round trip old at most), plus what
// this instance placed (or lost) since, which it knows exactly; what the
// other instances placed since shows at the next read. Never less than
// local (Redis may have missed writes during an outage).
func (s *redisStore) clusterLoad(dial string, local int64) int64 {
	m := s.counts.Load()
	if m == nil {
		return local
	}
	c, ok := (*m)[dial]
	if !ok {
		return local
	}
	return max(local, c.n+local-c.localAt)
}

// change runs cmd and publishes op for key, in one round trip.
func (s *redisStore) change(op byte, key uint64, cmd func(redis.Pipeliner)) {
	if !s.usable() {
		return
	}
	_, err := s.client.Pipelined(context.Background(), func(pipe redis.Pipeliner) error {
		cmd(pipe)
		pipe.Publish(context.Background(), s.channel, string(op)+" "+s.nonce+" "+strconv.FormatUint(key, 16))
		return nil
	})
	if err != nil {
		s.failed("change", err)
		return
	}
	s.worked()
}

// fetchRemote is the miss path of tableEntry under store redis: one
// round trip for the request's keys; the first that names an upstream of
// this pool is kept in the local table and chosen.
func (p *Policy) fetchRemote(ps *poolState, in *decideInput, laterAliases bool) int {
	got := p.remote.fetch(in.keys)
	for j, e := range got {
		if !e.ok || (j > 0 && !laterAliases && e.alias) {
			continue
		}
		rec := healthcheck.Lookup(e.dial)
		if rec == nil {
			continue
		}
		i := ps.indexByID(rec.ID)
		if i < 0 {
			continue
		}
		up := rec.ID
		if e.alias {
			up |= sessions.AliasBit
		}
		p.table.Put(p.tableKey(in.keys[j]), up, in.now, p.ttl)
		return i
	}
	return -1
}

// rememberRemote is remember under store redis: the local table as
// always, and Redis for the entries dueRemote says are due, all of the
// request's keys in one round trip.
func (p *Policy) rememberRemote(keys []uint64, id uint32, now uint32) {
	// Allocated only when something is due (then a round trip follows):
	// a known session's requests stay free of allocations.
	var ws []remoteWrite
	for i, key := range keys {
		up := id
		if i > 0 {
			up |= sessions.AliasBit
		}
		if w, ok := p.dueRemote(key, up, now); ok {
			ws = append(ws, w)
		}
	}
	if len(ws) > 0 {
		p.remote.record(ws, p.ttl)
	}
}

// putRemote records key -> up in the local table and in Redis when due.
func (p *Policy) putRemote(key uint64, up uint32, now uint32) {
	if w, ok := p.dueRemote(key, up, now); ok {
		p.remote.record([]remoteWrite{w}, p.ttl)
	}
}

// dueRemote records key -> up (up may carry sessions.AliasBit) in the local table
// and returns the write Redis is due: when the entry is new here, moved,
// or its sliding expiry crossed a quarter of the TTL since the last
// write. An app that sends its cookie again on every response, and a
// session's every request, cost Redis a write about four times per
// session_ttl.
func (p *Policy) dueRemote(key uint64, up uint32, now uint32) (remoteWrite, bool) {
	q := writeBackQuantum(p.ttl)
	old, live := p.table.Swap(p.tableKey(key), up, now, p.ttl)
	moved := live && old.Ref()&^sessions.EstablishedBit != up
	if live && !moved && old.Expires()/q == (now+p.ttl)/q {
		return remoteWrite{}, false
	}
	w := remoteWrite{key: key, alias: up&sessions.AliasBit != 0, how: writeSlide}
	switch {
	case !live:
		w.how = writeNew
	case moved:
		w.how = writeMove
		w.from, _ = registryDial(old.Upstream())
	}
	dial, ok := registryDial(up & sessions.UpstreamMask)
	if !ok {
		return remoteWrite{}, false
	}
	w.dial = dial
	return w, true
}

// applyRemote applies a change another instance published to the local
// table, for keys it knows (others are asked for when they are seen).
func (p *Policy) applyRemote(op byte, key uint64, e remoteEntry) {
	table := p.table
	if table == nil {
		return
	}
	now := sessions.Now()
	k := p.tableKey(key)
	switch op {
	case 'm':
		old, ok := table.Peek(k, now)
		if !ok {
			return
		}
		up := healthcheck.Get(e.dial).ID
		if e.alias {
			up |= sessions.AliasBit
		}
		if old.Ref()&^sessions.EstablishedBit != up {
			table.Put(k, up, now, old.Expires()-now)
		}
	case 'r':
		table.Retire(k, now+retireGrace)
	case 'd':
		table.Remove(k)
	}
}

// liveRemotes are the redis stores of live policies, for LiveSessions.
var liveRemotes sync.Map // *redisStore -> struct{}

// clusterSessions returns the most live sessions on dial any live
// redis store last read, and whether one has a reading.
func clusterSessions(dial string) (int64, bool) {
	var most int64
	found := false
	liveRemotes.Range(func(k, _ any) bool {
		if n, ok := k.(*redisStore).clusterSessions(dial); ok {
			most, found = max(most, n), true
		}
		return true
	})
	return most, found
}

// entryDial returns the dial of key's live local entry (a table key), or
// "" for a key the table does not have or an alias, which is not
// counted.
func (p *Policy) entryDial(key uint64) string {
	e, ok := p.table.Peek(key, sessions.Now())
	if !ok || e.Alias() {
		return ""
	}
	dial, _ := registryDial(e.Upstream())
	return dial
}
