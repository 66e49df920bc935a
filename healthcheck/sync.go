package healthcheck

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path"
	"reflect"
	"slices"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// Operator states are shared through Caddy's storage, so that every
// instance using the same storage (a shared file_system folder, redis,
// consul...) agrees on them. One key per upstream:
//
//	caddy-affinity/states/<url.QueryEscape(dial)>
//
// holding JSON such as
//
//	{"upstream":"10.0.0.5:8080","state":"draining","since":1767225600000000000,"by":"web-1/4c5b…","seen":1767229200000000000}
//
// since is unix nanoseconds; among the records for one upstream the one
// with the largest since wins (clocks of instances should be roughly in
// step). Only states set through the admin API are stored; the drain
// probe's decisions are local, since every instance runs its own probe.
// Setting "up" is stored like the others.
//
// seen is when an instance last used the upstream in its config (unix
// nanoseconds): every instance that uses it writes it again once it is
// seenRefresh (5 minutes) stale, so a record of a live upstream is never
// much older. A record whose seen (or since, if later) is older than
// stateGrace (24 hours) belongs to an address no instance sharing the
// storage has used for that long: any instance's syncer deletes it, and
// nobody applies it. An instance that does not use an upstream therefore
// never deletes a state that another one relies on.
const statesPrefix = "caddy-affinity/states"

// SyncInterval is how often a Syncer reads the stored states.
const SyncInterval = time.Second

// syncTimeout bounds one round of storage calls.
const syncTimeout = 10 * time.Second

// stateKey returns the storage key of an upstream's operator state.
func stateKey(dial string) string { return statesPrefix + "/" + url.QueryEscape(dial) }

// storedRecord is an operator record as written to storage.
type storedRecord struct {
	// Upstream repeats the dial address, so that a stray file in the
	// folder (a storage's temporary file) is not taken for a state.
	Upstream string `json:"upstream"`
	operatorRecord
	// Seen is when an instance last used the upstream (unix
	// nanoseconds); see statesPrefix.
	Seen int64 `json:"seen,omitempty"`
	// viaRedis is the RedisStates (redis_states.go) that kept the record
	// aside, nil if none: it keeps its own entries up to date, and
	// setPending leaves them.
	viaRedis *RedisStates
}

// syncers holds one Syncer per storage, shared by every policy (and every
// config, across reloads) using that storage.
var syncers = caddy.NewUsagePool()

// AcquireSyncer starts (or joins) the background syncer that shares
// operator states through the storage of ctx's config: states set through
// the admin API are written there, and states written by other instances
// are read every SyncInterval and applied here. The first read happens
// before AcquireSyncer returns, so a restarted instance has its stored
// states before it serves a request; if that read fails it is logged and
// retried, not returned.
//
// The affinity policy calls it from Provision and calls release from
// Cleanup. A reload (new config provisioned before the old one is cleaned
// up) keeps the same syncer running, switched to the new config's storage
// value; it stops when the last user releases it. release may be called
// more than once.
func AcquireSyncer(ctx caddy.Context) (release func(), err error) {
	storage := ctx.Storage()
	if storage == nil {
		return nil, errors.New("no Caddy storage to share upstream states through")
	}
	return acquireSyncer(defaultRegistry, storage)
}

func acquireSyncer(reg *registry, storage certmagic.Storage) (func(), error) {
	key := fmt.Sprintf("%p %s", reg, storageIdentity(storage))
	h := &heldStorage{storage}
	val, loaded, err := syncers.LoadOrNew(key, func() (caddy.Destructor, error) {
		s := newSyncer(reg, h, SyncInterval)
		s.start()
		return s, nil
	})
	if err != nil {
		return nil, err
	}
	s := val.(*Syncer)
	if loaded {
		s.hold(h)
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			s.unhold(h)
			_, _ = syncers.Delete(key)
		})
	}, nil
}

// storageIdentity names a storage by its configuration, so that the
// storage values of two configs (before and after a reload) that point to
// the same place share a syncer.
func storageIdentity(st certmagic.Storage) string {
	if s, ok := st.(fmt.Stringer); ok {
		return fmt.Sprintf("%T %s", st, s.String())
	}
	if b, err := json.Marshal(st); err == nil && string(b) != "{}" && string(b) != "null" {
		return fmt.Sprintf("%T %s", st, b)
	}
	if reflect.ValueOf(st).Kind() == reflect.Pointer {
		return fmt.Sprintf("%T %p", st, st)
	}
	return fmt.Sprintf("%T %v", st, st)
}

// heldStorage is one user's storage value; a pointer, so that two users
// handing in equal values are still told apart.
type heldStorage struct{ certmagic.Storage }

// Syncer shares operator states through a Caddy storage; see
// AcquireSyncer. It is a caddy.Destructor for the usage pool.
type Syncer struct {
	reg      *registry
	interval time.Duration

	holds holds[heldStorage] // the users' storage values; the newest is used

	base   context.Context
	cancel context.CancelFunc
	stop   chan struct{}
	done   chan struct{}

	// Used by one round at a time only (the first synchronous round,
	// then the loop).
	outcome roundOutcome
	bad     map[string]string // key -> problem already logged
}

func newSyncer(reg *registry, h *heldStorage, interval time.Duration) *Syncer {
	base, cancel := context.WithCancel(context.Background())
	s := &Syncer{
		reg:      reg,
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

// start reads the stored states once, makes the syncer the registry's
// current one (where the admin API writes) and starts the loop.
func (s *Syncer) start() {
	for _, name := range []string{forgetAfterEnv, stateGraceEnv} {
		if v := os.Getenv(name); v != "" {
			s.logger().Warn("test-only setting in effect: upstream records and states expire sooner",
				zap.String(name, v), zap.Duration("forget_after", forgetAfter), zap.Duration("state_grace", stateGrace))
		}
	}
	s.round()
	s.reg.addSyncer(s)
	go s.loop()
}

func (s *Syncer) hold(h *heldStorage)   { s.holds.add(h) }
func (s *Syncer) unhold(h *heldStorage) { s.holds.remove(h) }

// storage returns the newest storage value still held, or nil.
func (s *Syncer) storage() certmagic.Storage {
	if h := s.holds.newest(); h != nil {
		return h.Storage
	}
	return nil
}

func (s *Syncer) logger() *zap.Logger { return s.reg.logger().Named("sync") }

func (s *Syncer) loop() {
	defer close(s.done)
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			s.round()
		}
	}
}

// round runs one sync with a timeout and logs its outcome when that
// changes (a storage that stays unreachable is logged once, not every
// second).
func (s *Syncer) round() {
	ctx, cancel := context.WithTimeout(s.base, syncTimeout)
	defer cancel()
	s.outcome.log(s.logger(), "storage", s.interval, s.syncOnce(ctx))
}

// syncOnce applies every stored operator state newer than the one known
// here, then writes every operator state known here that storage lacks or
// has an older one of (a write that failed, a state set through the admin
// API before any syncer ran, or a write lost to a concurrent one), and
// the seen stamp of the upstreams this instance uses. It deletes the
// records no instance has used for stateGrace; states for addresses this
// instance does not know are kept aside, for when a config uses them.
func (s *Syncer) syncOnce(ctx context.Context) error {
	st := s.storage()
	if st == nil {
		return nil // being released
	}
	now := s.reg.clock()
	keys, err := st.List(ctx, statesPrefix, false)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("listing %s: %w", statesPrefix, err)
	}
	var errs []error
	stored := make(map[string]storedRecord, len(keys))
	for _, key := range keys {
		rec, err := s.load(ctx, st, key)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue // deleted since the listing
			}
			errs = append(errs, err)
			continue
		}
		if rec == nil {
			continue
		}
		if !fresh(*rec, now) {
			// An instance using the upstream would have refreshed seen
			// within seenRefresh; nobody has for stateGrace. A concurrent
			// operator's write deleted here is written again by its
			// instance's next round (its record is newer than storage's).
			if err := st.Delete(ctx, key); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, fmt.Errorf("deleting %s: %w", key, err))
				continue
			}
			logStaleDeleted(s.logger(), *rec)
			continue
		}
		stored[rec.Upstream] = *rec
		if u := s.reg.lookup(rec.Upstream); u != nil {
			s.reg.applyShared(u, rec.operatorRecord)
		}
	}
	s.reg.setPending(stored)
	for _, u := range s.reg.all() {
		if !usedWithinGrace(u, now) {
			continue
		}
		rec, ok := stored[u.Dial]
		write, seen, due := writeBack(u, rec, ok)
		if !due {
			continue
		}
		if err := writeRecord(ctx, st, u.Dial, write, seen); err != nil {
			errs = append(errs, err)
			continue
		}
		s.logger().Debug("wrote operator state to storage",
			zap.String("upstream", u.Dial), zap.String("state", write.State.String()))
	}
	return errors.Join(errs...)
}

// setPending keeps aside the stored states (of a round) of the addresses
// not known here, in place of the previous round's. Decided under the
// registry's lock, so that a record forgotten during the round is among
// them.
func (r *registry) setPending(stored map[string]storedRecord) {
	pending := make(map[string]storedRecord)
	r.mu.Lock()
	defer r.mu.Unlock()
	for dial, rec := range stored {
		if r.byDial[dial] == nil {
			pending[dial] = rec
		}
	}
	for dial, rec := range r.pending {
		if rec.viaRedis != nil && rec.Since > pending[dial].Since {
			pending[dial] = rec
		}
	}
	r.pending = pending
}

// load reads one stored record. A key that is not a state record (a
// temporary file, a foreign file) gives nil, nil and is logged once.
func (s *Syncer) load(ctx context.Context, st certmagic.Storage, key string) (*storedRecord, error) {
	b, err := st.Load(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", key, err)
	}
	var rec storedRecord
	problem := ""
	if err := json.Unmarshal(b, &rec); err != nil {
		problem = "not a state record: " + err.Error()
	} else if rec.Upstream == "" || rec.Since <= 0 {
		problem = "state record lacks upstream or since"
	} else if stateKey(rec.Upstream) != statesPrefix+"/"+path.Base(key) {
		// A storage's temporary copy, or a file renamed by hand.
		s.logger().Debug("ignoring state record under another key",
			zap.String("key", key), zap.String("upstream", rec.Upstream))
		return nil, nil
	}
	if problem != "" {
		if s.bad[key] != problem {
			s.bad[key] = problem
			s.logger().Warn("ignoring malformed upstream state in storage",
				zap.String("key", key), zap.String("problem", problem))
		}
		return nil, nil
	}
	delete(s.bad, key)
	return &rec, nil
}

// write stores an operator record (from the admin API) right away.
func (s *Syncer) write(ctx context.Context, dial string, rec operatorRecord, seen int64) error {
	st := s.storage()
	if st == nil {
		return errors.New("storage syncer is stopping")
	}
	return writeRecord(ctx, st, dial, rec, seen)
}

func writeRecord(ctx context.Context, st certmagic.Storage, dial string, rec operatorRecord, seen int64) error {
	b, err := json.Marshal(storedRecord{Upstream: dial, operatorRecord: rec, Seen: seen})
	if err != nil {
		return err
	}
	if err := st.Store(ctx, stateKey(dial), b); err != nil {
		return fmt.Errorf("storing %s: %w", stateKey(dial), err)
	}
	return nil
}

// Destruct stops the syncer when the last user has released it.
func (s *Syncer) Destruct() error {
	s.reg.removeSyncer(s)
	close(s.stop)
	s.cancel()
	<-s.done
	return nil
}

// addSyncer makes s the syncer the admin API writes through.
func (r *registry) addSyncer(s *Syncer) {
	r.syncMu.Lock()
	defer r.syncMu.Unlock()
	r.syncers = append(r.syncers, s)
}

func (r *registry) removeSyncer(s *Syncer) {
	r.syncMu.Lock()
	defer r.syncMu.Unlock()
	if i := slices.Index(r.syncers, s); i >= 0 {
		r.syncers = slices.Delete(r.syncers, i, i+1)
	}
}

// currentSyncer returns the most recently started live syncer, or nil
// when no affinity policy has started one yet.
func (r *registry) currentSyncer() *Syncer {
	r.syncMu.Lock()
	defer r.syncMu.Unlock()
	if len(r.syncers) == 0 {
		return nil
	}
	return r.syncers[len(r.syncers)-1]
}

// defaultInstance names this Caddy instance in stored records: the host
// name and Caddy's instance ID.
var defaultInstance = sync.OnceValue(func() string {
	host, _ := os.Hostname()
	id, err := caddy.InstanceID()
	switch {
	case err == nil && host != "":
		return host + "/" + id.String()
	case err == nil:
		return id.String()
	case host != "":
		return fmt.Sprintf("%s/pid-%d", host, os.Getpid())
	}
	return fmt.Sprintf("pid-%d", os.Getpid())
})

// Interface guards
var _ caddy.Destructor = (*Syncer)(nil)
