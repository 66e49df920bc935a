package sessions

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// `store local`: the session table written to Caddy's storage (a compact
// binary snapshot) every interval while it changes and when the last
// policy lets go of it (shutdown), and read back when the farm starts,
// before the first request. Upstream IDs are process-local (the
// healthcheck registry numbers dial addresses as it meets them), so the
// snapshot names upstreams by dial address and maps them to this
// process's IDs when it is read.

// SnapshotStorageKey is where the snapshot is kept in Caddy's storage.
// It names no instance: a restarted instance (whose container may get a
// fresh instance ID) finds it; instances sharing one storage read the
// last one written, whose entries name the same upstreams.
const SnapshotStorageKey = "caddy-affinity/sessions/table"

// Snapshot format, little endian:
//
//	magic "CAST", version u8, 3 zero bytes, saved-at u32 (table seconds)
//	entry count u32, then per entry 16 bytes:
//	    key u64 (as the table stores it: hashed, scoped)
//	    ref u32: dial index | AliasBit | EstablishedBit
//	    expires u32 (table seconds: the entry keeps the time it had left,
//	         less the time the process was down, as the app's own
//	         sessions age meanwhile)
//	dial count u32, then per dial: length u16, bytes
//	CRC-32C of everything before it, u32
//
// Entries come before dials since the dials are known only once every
// entry is written; fixed-size entries let the reader find the dials.
const (
	snapshotMagic   = "CAST"
	snapshotVersion = 1
	snapshotHeader  = 12
	snapshotEntry   = 16
	// maxSnapshotDials bounds the dial table (a ref has 30 bits, but no
	// farm has more than a few thousand upstreams).
	maxSnapshotDials = 1 << 16
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// encodeSnapshot writes every entry of t live at now.
func encodeSnapshot(t *Table, now uint32, dialOf func(id uint32) (string, bool)) []byte {
	buf := make([]byte, snapshotHeader+4, snapshotHeader+4+snapshotEntry*t.Len()+1024)
	copy(buf, snapshotMagic)
	buf[4] = snapshotVersion
	binary.LittleEndian.PutUint32(buf[8:], now)
	// ref[id] is the dial index of upstream id plus one (0: not seen
	// yet, -1: no dial, the entry is skipped).
	var ref []int32
	var dials []string
	count := uint32(0)
	t.Export(now, func(key uint64, e Entry) {
		id := e.Upstream()
		for int(id) >= len(ref) {
			ref = append(ref, 0)
		}
		if ref[id] == 0 {
			ref[id] = -1
			if dial, ok := dialOf(id); ok && len(dial) <= 0xffff && len(dials) < maxSnapshotDials {
				dials = append(dials, dial)
				ref[id] = int32(len(dials))
			}
		}
		if ref[id] < 0 {
			return
		}
		// Not StoredBit: a restarted instance does not know what a
		// shared store holds.
		flags := e.Ref() &^ (UpstreamMask | StoredBit)
		buf = binary.LittleEndian.AppendUint64(buf, key)
		buf = binary.LittleEndian.AppendUint32(buf, uint32(ref[id]-1)|flags)
		buf = binary.LittleEndian.AppendUint32(buf, e.Expires())
		count++
	})
	binary.LittleEndian.PutUint32(buf[snapshotHeader:], count)
	buf = binary.LittleEndian.AppendUint32(buf, uint32(len(dials)))
	for _, d := range dials {
		buf = binary.LittleEndian.AppendUint16(buf, uint16(len(d)))
		buf = append(buf, d...)
	}
	return binary.LittleEndian.AppendUint32(buf, crc32.Checksum(buf, castagnoli))
}

// snapshotStats is what reading a snapshot did.
type snapshotStats struct {
	savedAt            uint32
	entries            int // in the snapshot
	restored, expired  int
	kept, unknownDials int
}

// decodeSnapshot records the entries of snapshot b live at now in t,
// mapping its dials to IDs with idOf. A corrupt snapshot records nothing.
func decodeSnapshot(b []byte, t *Table, now uint32, idOf func(dial string) uint32) (snapshotStats, error) {
	var st snapshotStats
	if len(b) < snapshotHeader+4+4+4 || string(b[:4]) != snapshotMagic {
		return st, errors.New("not a session snapshot")
	}
	if b[4] != snapshotVersion {
		return st, fmt.Errorf("snapshot version %d, this build reads %d", b[4], snapshotVersion)
	}
	body, sum := b[:len(b)-4], binary.LittleEndian.Uint32(b[len(b)-4:])
	if crc32.Checksum(body, castagnoli) != sum {
		return st, errors.New("snapshot checksum mismatch (torn or damaged)")
	}
	st.savedAt = binary.LittleEndian.Uint32(b[8:])
	n := int(binary.LittleEndian.Uint32(b[snapshotHeader:]))
	entries := b[snapshotHeader+4:]
	if n > len(entries)/snapshotEntry {
		return st, errors.New("snapshot truncated")
	}
	st.entries = n
	rest := entries[n*snapshotEntry : len(entries)-4]
	entries = entries[:n*snapshotEntry]
	if len(rest) < 4 {
		return st, errors.New("snapshot truncated")
	}
	nd := int(binary.LittleEndian.Uint32(rest))
	rest = rest[4:]
	if nd > maxSnapshotDials {
		return st, fmt.Errorf("snapshot has %d dials", nd)
	}
	ids := make([]uint32, nd)
	for i := range ids {
		if len(rest) < 2 || len(rest) < 2+int(binary.LittleEndian.Uint16(rest)) {
			return st, errors.New("snapshot truncated")
		}
		l := int(binary.LittleEndian.Uint16(rest))
		ids[i] = idOf(string(rest[2 : 2+l]))
		rest = rest[2+l:]
	}
	for off := 0; off < len(entries); off += snapshotEntry {
		e := entries[off : off+snapshotEntry]
		key := binary.LittleEndian.Uint64(e)
		ref := binary.LittleEndian.Uint32(e[8:])
		expires := binary.LittleEndian.Uint32(e[12:])
		di := ref & UpstreamMask
		if int(di) >= len(ids) || ids[di] > UpstreamMask {
			st.unknownDials++
			continue
		}
		switch {
		case expires < now:
			st.expired++
		case t.Restore(key, NewEntry(ids[di]|ref&^(UpstreamMask|StoredBit), expires), now):
			st.restored++
		default:
			st.kept++ // the key has a newer entry already
		}
	}
	return st, nil
}

// persister writes the farm's table to Caddy's storage for the policies
// with store local, and reads it back once, when the first of them
// arrives. Its loop runs apart from the farm's, so that writing a large
// table never delays the table clock.
type persister struct {
	table  *Table
	logger *zap.Logger

	mu     sync.Mutex
	wants  map[*Handle]persistWant // live policies with store local
	loaded bool                    // the snapshot was read (or tried)
	// last is the newest wanting policy's storage and interval; saving
	// goes there.
	last  persistWant
	saved uint64    // table.Changes() at the last write
	at    time.Time // when the last write was, or the loop started
	// failing is set after a failed write, so that a storage that stays
	// broken is logged once, not every interval.
	failing bool

	stop, done chan struct{}
	stopOnce   sync.Once
}

// persistWant is what a policy with store local asks for.
type persistWant struct {
	storage  certmagic.Storage
	interval time.Duration
}

// persistTick is how often the persister's loop looks whether an
// interval has passed.
const persistTick = time.Second

// persistTimeout bounds one read or write of the snapshot, so that a
// hung storage cannot hold up a start or a stop for long.
const persistTimeout = 10 * time.Second

func newPersister(t *Table) *persister {
	ps := &persister{
		table:  t,
		logger: caddy.Log().Named("affinity.store"),
		wants:  make(map[*Handle]persistWant),
		at:     time.Now(),
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	go ps.loop()
	return ps
}

// want records that p persists the table to storage every interval; the
// first call reads the snapshot back into the table, before p serves.
func (ps *persister) want(p *Handle, storage certmagic.Storage, interval time.Duration) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	w := persistWant{storage: storage, interval: interval}
	ps.wants[p], ps.last = w, w
	if ps.loaded {
		return
	}
	ps.loaded = true
	ps.load(storage)
}

// load reads the snapshot into the table; ps.mu is held.
func (ps *persister) load(storage certmagic.Storage) {
	ctx, cancel := context.WithTimeout(context.Background(), persistTimeout)
	defer cancel()
	start := time.Now()
	b, err := storage.Load(ctx, SnapshotStorageKey)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return
	case err != nil:
		ps.logger.Error("reading the session snapshot; starting with an empty session table",
			zap.String("key", SnapshotStorageKey), zap.Error(err))
		return
	}
	now := Seconds(time.Now())
	st, err := decodeSnapshot(b, ps.table, now, registryID)
	if err != nil {
		ps.logger.Error("the session snapshot is unreadable; starting with an empty session table",
			zap.String("key", SnapshotStorageKey), zap.Int("bytes", len(b)), zap.Error(err))
		return
	}
	// What was read is saved: no write until something changes.
	ps.saved = ps.table.Changes()
	ps.logger.Info("restored the session table from storage",
		zap.String("key", SnapshotStorageKey),
		zap.Int("sessions", st.restored),
		zap.Int("expired", st.expired),
		zap.Int("newer_in_table", st.kept),
		zap.Int("bytes", len(b)),
		zap.Duration("snapshot_age", time.Duration(int64(now)-int64(st.savedAt))*time.Second),
		zap.Duration("took", time.Since(start)))
}

// release records that p no longer persists the table. When it was the
// last policy that did (the process stops, or a reload turned store local
// off), the table is written once more.
func (ps *persister) release(p *Handle) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if _, ok := ps.wants[p]; !ok {
		return
	}
	delete(ps.wants, p)
	if len(ps.wants) == 0 {
		ps.saveLocked(true)
	}
}

func (ps *persister) loop() {
	defer close(ps.done)
	tick := time.NewTicker(persistTick)
	defer tick.Stop()
	for {
		select {
		case <-ps.stop:
			return
		case <-tick.C:
			ps.mu.Lock()
			if len(ps.wants) > 0 && time.Since(ps.at) >= ps.last.interval {
				ps.saveLocked(false)
			}
			ps.mu.Unlock()
		}
	}
}

// saveLocked writes the table if it changed since the last write; ps.mu
// is held. final says the write is the last one (shutdown), logged.
func (ps *persister) saveLocked(final bool) {
	ps.at = time.Now()
	if ps.last.storage == nil {
		return
	}
	changes := ps.table.Changes()
	if changes == ps.saved {
		return
	}
	start := time.Now()
	b := encodeSnapshot(ps.table, Seconds(start), registryDial)
	ctx, cancel := context.WithTimeout(context.Background(), persistTimeout)
	defer cancel()
	if err := ps.last.storage.Store(ctx, SnapshotStorageKey, b); err != nil {
		if !ps.failing || final {
			ps.logger.Error("writing the session snapshot; sessions learned since the last write are lost if the process stops now",
				zap.String("key", SnapshotStorageKey), zap.Error(err))
		}
		ps.failing = true
		return
	}
	if ps.failing {
		ps.logger.Info("writing the session snapshot works again", zap.String("key", SnapshotStorageKey))
	}
	ps.failing = false
	ps.saved = changes
	if final {
		ps.logger.Info("wrote the session table to storage",
			zap.String("key", SnapshotStorageKey),
			zap.Int("bytes", len(b)),
			zap.Duration("took", time.Since(start)))
	}
}

// close stops the loop (the final write was made by release).
func (ps *persister) close() {
	ps.stopOnce.Do(func() { close(ps.stop) })
	<-ps.done
}
