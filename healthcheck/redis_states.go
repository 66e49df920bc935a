package healthcheck

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Operator states can also travel through Redis, for instances that share
// `store redis` but no Caddy storage. A RedisStates keeps them in one
// hash per key prefix,
//
//	<prefix>:states   field <dial>, value {"upstream":…,"state":…,"since":…,"by":…,"seen":…}
//
// the same records as in Caddy storage (see statesPrefix: since orders
// them, by names the instance whose admin API took the order, seen is
// when an instance last used the upstream), and publishes every state an
// operator sets on
//
//	<prefix>:states:changed   (a regular channel: in Redis Cluster a
//	                          PUBLISH reaches the subscribers of every node)
//
// so that the other instances apply it at once. Pub/sub may lose a
// message (a subscriber reconnecting after a failover, a network blip):
// every SyncInterval each instance also reads the hash, applies what is
// newer, and writes back what it knows that the hash lacks, so a state
// reaches every instance within SyncInterval plus one round trip even
// when no message arrives.
//
// One key: every call touches one hash slot (Cluster). A write is a
// script that keeps a newer record (larger since) than the one written,
// and sets the key's TTL to stateGrace plus an hour: the instances using
// an upstream rewrite its record every seenRefresh, so the hash lives as
// long as one of them does, and goes when none has run for a day.
// Records no instance has used for stateGrace are deleted by any
// instance, as in storage.
const (
	redisStatesSuffix  = ":states"
	redisChangedSuffix = ":states:changed"
	redisStatesTTL     = time.Hour
)

// writeNewerScript stores ARGV[2] in field ARGV[1] of KEYS[1] unless the
// stored record's since is larger than ARGV[3] (both decimal unix
// nanoseconds: compared as strings of digits, since Lua's numbers lose
// nanoseconds), and sets the key's TTL to ARGV[4] ms. It returns 1 if it
// wrote.
var writeNewerScript = redis.NewScript(`
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local s = string.match(cur, '"since":(%d+)')
  if s and (#s > #ARGV[3] or (#s == #ARGV[3] and s > ARGV[3])) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
`)

// deleteIfSameScript deletes field ARGV[1] of KEYS[1] if it still holds
// ARGV[2]: a stale record is deleted, a record just rewritten is not.
var deleteIfSameScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
`)

// redisStatesPool holds one RedisStates per (connection, prefix), shared
// by the policies (and configs, across reloads) that use it.
var redisStatesPool = caddy.NewUsagePool()

// AcquireRedisStates starts (or joins) sharing the operator states of
// this process through Redis under prefix (the store's key_prefix):
// states set through this instance's admin API are written there and
// published, and those of every other instance using the same Redis and
// prefix are applied here. The first read happens before it returns, so
// that a restarted instance has the shared states before it serves; a
// failure is logged and retried every SyncInterval, not returned.
//
// connection names the Redis connection (redisconn.Config.Identity):
// callers with equal connection and prefix share one RedisStates. A
// reload that acquires it again with a new client (before the old
// config releases) switches it to the newest client still held; it
// stops when the last holder releases it. release may be called more
// than once. The client stays the caller's: RedisStates never closes it.
func AcquireRedisStates(client redis.UniversalClient, connection, prefix string) (release func(), err error) {
	return acquireRedisStates(defaultRegistry, client, connection, prefix, SyncInterval)
}

func acquireRedisStates(reg *registry, client redis.UniversalClient, connection, prefix string, interval time.Duration) (func(), error) {
	if client == nil {
		return nil, errors.New("no Redis client to share upstream states through")
	}
	key := fmt.Sprintf("%p %s %s", reg, connection, prefix)
	h := &heldClient{client}
	val, loaded, err := redisStatesPool.LoadOrNew(key, func() (caddy.Destructor, error) {
		s := newRedisStates(reg, h, prefix, interval)
		s.start()
		return s, nil
	})
	if err != nil {
		return nil, err
	}
	s := val.(*RedisStates)
	if loaded {
		s.hold(h)
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			s.unhold(h)
			_, _ = redisStatesPool.Delete(key)
		})
	}, nil
}

// heldClient is one holder's client; a pointer, so that two holders
// handing in the same client are still told apart.
type heldClient struct{ redis.UniversalClient }

// RedisStates shares operator states through Redis; see
// AcquireRedisStates. It is a caddy.Destructor for the usage pool.
type RedisStates struct {
	reg      *registry
	key      string // the hash
	channel  string // changes are published here
	interval time.Duration

	holds holds[heldClient] // the newest is used

	base   context.Context
	cancel context.CancelFunc
	stop   chan struct{}
	done   chan struct{}

	// Used by the loop only (and the first round before it starts).
	outcome roundOutcome
	bad     map[string]string // field -> problem already logged
}

func newRedisStates(reg *registry, h *heldClient, prefix string, interval time.Duration) *RedisStates {
	base, cancel := context.WithCancel(context.Background())
	s := &RedisStates{
		reg:      reg,
		key:      prefix + redisStatesSuffix,
		channel:  prefix + redisChangedSuffix,
		interval: interval,
		base:     base,
		cancel:   cancel,
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
		bad:      make(map[string]string),
	}
	s.holds.add(h)
	return s
}

func (s *RedisStates) start() {
	s.round()
	addRedisStates(s.reg, s)
	go s.loop()
}

func (s *RedisStates) hold(h *heldClient)   { s.holds.add(h) }
func (s *RedisStates) unhold(h *heldClient) { s.holds.remove(h) }

// client returns the newest client still held, or nil.
func (s *RedisStates) client() redis.UniversalClient {
	if h := s.holds.newest(); h != nil {
		return h.UniversalClient
	}
	return nil
}

func (s *RedisStates) logger() *zap.Logger { return s.reg.logger().Named("sync.redis") }

// loop reads the hash every interval and applies the published changes
// as they come. The subscription is made on the newest client, again
// when that changes (a reload) and, at the next tick, when its channel
// closed (its client was closed); go-redis itself reconnects it when its
// connection fails (a failover, a Redis restart).
func (s *RedisStates) loop() {
	defer close(s.done)
	t := time.NewTicker(s.interval)
	defer t.Stop()
	var (
		sub       *redis.PubSub
		subClient redis.UniversalClient
		msgs      <-chan *redis.Message
	)
	defer func() {
		if sub != nil {
			_ = sub.Close()
		}
	}()
	broken := false // the subscription's channel closed
	for {
		if c := s.client(); c != subClient {
			if sub != nil {
				_ = sub.Close()
			}
			sub, subClient, msgs = nil, c, nil
			if c != nil {
				sub = c.Subscribe(s.base, s.channel)
				msgs = sub.Channel()
			}
		}
		select {
		case <-s.stop:
			return
		case m, ok := <-msgs:
			if !ok {
				msgs, broken = nil, true
				continue
			}
			s.applyMessage(m.Payload)
		case <-t.C:
			if broken {
				subClient, broken = nil, false // subscribe again, once a tick at most
			}
			s.round()
		}
	}
}

// applyMessage applies a published record.
func (s *RedisStates) applyMessage(payload string) {
	rec, ok := s.decode("", payload)
	if !ok || !fresh(rec, s.reg.clock()) {
		return
	}
	s.apply(rec)
}

// apply applies a shared record to a known upstream, or keeps it aside
// for when a config uses the address.
func (s *RedisStates) apply(rec storedRecord) {
	if u := s.reg.lookup(rec.Upstream); u != nil {
		s.reg.applyShared(u, rec.operatorRecord)
		return
	}
	s.reg.addPending(s, rec)
}

// addPending keeps a shared record of an address not known here, unless
// a newer one is kept already.
func (r *registry) addPending(s *RedisStates, rec storedRecord) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.byDial[rec.Upstream] != nil {
		return // known since: the next round applies it
	}
	if prev, ok := r.pending[rec.Upstream]; ok && prev.Since > rec.Since {
		return
	}
	rec.viaRedis = s
	r.pending[rec.Upstream] = rec
}

// dropRedisPending forgets the records s kept aside that its round no
// longer found in Redis (deleted as stale by some instance).
func (r *registry) dropRedisPending(s *RedisStates, found map[string]storedRecord) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for dial, rec := range r.pending {
		if _, ok := found[dial]; rec.viaRedis == s && !ok {
			delete(r.pending, dial)
		}
	}
}

// decode reads one record (field is its hash field, "" for a published
// one). A malformed one gives false and is logged once per field.
func (s *RedisStates) decode(field, raw string) (storedRecord, bool) {
	var rec storedRecord
	problem := ""
	if err := json.Unmarshal([]byte(raw), &rec); err != nil {
		problem = "not a state record: " + err.Error()
	} else if rec.Upstream == "" || rec.Since <= 0 {
		problem = "state record lacks upstream or since"
	} else if field != "" && rec.Upstream != field {
		problem = fmt.Sprintf("state record of %q under field %q", rec.Upstream, field)
	}
	if problem == "" {
		delete(s.bad, field)
		return rec, true
	}
	if s.bad[field] != problem {
		s.bad[field] = problem
		s.logger().Warn("ignoring malformed upstream state in Redis",
			zap.String("key", s.key), zap.String("field", field), zap.String("problem", problem))
	}
	return storedRecord{}, false
}

// round runs one sync, bounded, and logs its outcome when it changes.
func (s *RedisStates) round() {
	ctx, cancel := context.WithTimeout(s.base, syncTimeout)
	defer cancel()
	s.outcome.log(s.logger(), "Redis", s.interval, s.syncOnce(ctx))
}

// syncOnce applies every record of the hash newer than what is known
// here, deletes the records no instance has used for stateGrace, and
// writes every operator state known here that the hash lacks or has an
// older one of (a write that failed during an outage, a state set before
// the transport started), and the seen stamp of the upstreams used here
// once it is seenRefresh stale.
func (s *RedisStates) syncOnce(ctx context.Context) error {
	c := s.client()
	if c == nil {
		return nil // being released
	}
	now := s.reg.clock()
	all, err := c.HGetAll(ctx, s.key).Result()
	if err != nil {
		return fmt.Errorf("reading %s: %w", s.key, err)
	}
	var errs []error
	stored := make(map[string]storedRecord, len(all))
	for field, raw := range all {
		rec, ok := s.decode(field, raw)
		if !ok {
			continue
		}
		if !fresh(rec, now) {
			if err := deleteIfSameScript.Run(ctx, c, []string{s.key}, field, raw).Err(); err != nil {
				errs = append(errs, fmt.Errorf("deleting %s %s: %w", s.key, field, err))
				continue
			}
			logStaleDeleted(s.logger(), rec)
			continue
		}
		stored[field] = rec
		s.apply(rec)
	}
	s.reg.dropRedisPending(s, stored)
	for _, u := range s.reg.all() {
		if !usedWithinGrace(u, now) {
			continue
		}
		rec, ok := stored[u.Dial]
		write, seen, due := writeBack(u, rec, ok)
		if !due {
			continue
		}
		if _, err := s.write(ctx, c, u.Dial, write, seen); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// write stores a record unless a newer one is stored, and returns the
// record as written, or nil when a newer one kept it out.
func (s *RedisStates) write(ctx context.Context, c redis.UniversalClient, dial string, rec operatorRecord, seen int64) ([]byte, error) {
	b, err := json.Marshal(storedRecord{Upstream: dial, operatorRecord: rec, Seen: seen})
	if err != nil {
		return nil, err
	}
	ttl := (stateGrace + redisStatesTTL).Milliseconds()
	n, err := writeNewerScript.Run(ctx, c, []string{s.key}, dial, b, strconv.FormatInt(rec.Since, 10), ttl).Int()
	if err != nil {
		return nil, fmt.Errorf("writing %s %s: %w", s.key, dial, err)
	}
	if n != 1 {
		return nil, nil
	}
	return b, nil
}

// share writes an operator's record and publishes it, for the other
// instances to apply at once. A record refused because a newer one is
// stored is not published: the next round applies the newer one here.
func (s *RedisStates) share(ctx context.Context, dial string, rec operatorRecord, seen int64) error {
	c := s.client()
	if c == nil {
		return errors.New("redis state sync is stopping")
	}
	b, err := s.write(ctx, c, dial, rec, seen)
	if err != nil || b == nil {
		return err
	}
	if err := c.Publish(ctx, s.channel, b).Err(); err != nil {
		// Stored: the others read it within SyncInterval anyway.
		s.logger().Debug("publishing a state change failed; the others read it at their next round",
			zap.String("upstream", dial), zap.Error(err))
	}
	return nil
}

// Destruct stops sharing when the last holder has released it.
func (s *RedisStates) Destruct() error {
	removeRedisStates(s.reg, s)
	close(s.stop)
	s.cancel()
	<-s.done
	s.reg.dropRedisPending(s, nil) // nothing of it kept aside any more
	return nil
}

// The live RedisStates of each registry, where Operate shares a state.
var (
	redisStatesMu   sync.Mutex
	redisStatesLive = map[*registry][]*RedisStates{}
)

func addRedisStates(r *registry, s *RedisStates) {
	redisStatesMu.Lock()
	defer redisStatesMu.Unlock()
	redisStatesLive[r] = append(redisStatesLive[r], s)
}

func removeRedisStates(r *registry, s *RedisStates) {
	redisStatesMu.Lock()
	defer redisStatesMu.Unlock()
	live := redisStatesLive[r]
	if i := slices.Index(live, s); i >= 0 {
		live = slices.Delete(live, i, i+1)
	}
	if len(live) == 0 {
		delete(redisStatesLive, r)
	} else {
		redisStatesLive[r] = live
	}
}

// shareThroughRedis writes and publishes an operator's record through
// every live RedisStates of the registry (one per Redis and prefix).
func (r *registry) shareThroughRedis(ctx context.Context, dial string, rec operatorRecord, seen int64) error {
	redisStatesMu.Lock()
	live := slices.Clone(redisStatesLive[r])
	redisStatesMu.Unlock()
	var errs []error
	for _, s := range live {
		if err := s.share(ctx, dial, rec, seen); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Interface guards
var _ caddy.Destructor = (*RedisStates)(nil)
