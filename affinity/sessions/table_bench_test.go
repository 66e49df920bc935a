package sessions

import (
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"testing"
)

// Scale benchmarks of the session table for BENCHMARKS.md: how its
// operations and its memory grow with the number of sessions it holds.
//
//	go test -run '^$' -bench 'TableScale|TableBytes|TableChurn' -benchmem ./affinity/sessions/

// BenchmarkTableScale measures the session table at 1k, 100k and 1M
// live sessions:
//
//   - get: a returning session's lookup (a hit, sliding its TTL);
//   - put/known: what every served request does, recording a key that is
//     already there with the same upstream;
//   - put/new-full: a new session entering a table at its bound, which
//     evicts one entry first.
//
// Keys are visited in random order, so a large table pays its cache
// misses as a server does.
func BenchmarkTableScale(b *testing.B) {
	const ttl = 1200
	for _, n := range []int{1_000, 100_000, 1_000_000} {
		rng := rand.New(rand.NewPCG(uint64(n), 7))
		keys := make([]uint64, n)
		for i := range keys {
			keys[i] = rng.Uint64()
		}

		// Room to spare, so that every key stays.
		tb := NewTable(4*n + Shards*16)
		for i, k := range keys {
			tb.Put(k, uint32(i%16), 0, ttl)
		}
		if tb.Len() != n {
			b.Fatalf("table holds %d of %d", tb.Len(), n)
		}
		b.Run(fmt.Sprintf("get/sessions=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, ok := tb.Get(keys[i], 1, ttl); !ok {
					b.Fatal("miss")
				}
				if i++; i == n {
					i = 0
				}
			}
		})
		b.Run(fmt.Sprintf("put/known/sessions=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				tb.Put(keys[i], uint32(i%16), 1, ttl)
				if i++; i == n {
					i = 0
				}
			}
		})

		// A table at its bound (max_sessions n, which the shards round
		// down to a multiple of 256), then new keys.
		full := NewTable(n)
		bound := int(full.perShard.Load()) * Shards
		for i := 0; i < 4*n && full.Len() < bound; i += 1000 {
			for j := 0; j < 1000; j++ {
				full.Put(rng.Uint64(), uint32(j%16), 0, ttl)
			}
		}
		b.Run(fmt.Sprintf("put/new-full/sessions=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				full.Put(rng.Uint64(), uint32(i%16), 1, ttl)
				i++
			}
		})
	}
}

// BenchmarkTableBytes reports the heap bytes the session table holds per
// live session when max_sessions is 100k or 1M and the table is full to
// its bound (max_sessions rounded down to a multiple of the 256 shards),
// filled with random keys as real session keys are.
func BenchmarkTableBytes(b *testing.B) {
	for _, n := range []int{100_000, 1_000_000} {
		b.Run(fmt.Sprintf("sessions=%d", n), func(b *testing.B) {
			rng := rand.New(rand.NewPCG(uint64(n), 11))
			for b.Loop() {
				before := heapInUse()
				tb := NewTable(n)
				bound := int(tb.perShard.Load()) * Shards
				for i := 0; i < 4*n && tb.Len() < bound; i += 1000 {
					for j := 0; j < 1000; j++ {
						tb.Put(rng.Uint64(), uint32(j%16), 0, 1200)
					}
				}
				after := heapInUse()
				live := tb.Len()
				if live < bound*99/100 {
					b.Fatalf("table holds %d, bound %d", live, bound)
				}
				b.ReportMetric(float64(after-before)/float64(live), "B/session")
				b.ReportMetric(float64(live), "sessions")
			}
		})
	}
}

// BenchmarkTableChurn reports the session table's heap at max_sessions
// 1M (and 10M with AFFINITY_BENCH_10M=1, about a minute and 2 GiB of
// heap before this table) once it is full of random keys and 3 ×
// max_sessions more have gone through it, each evicting one, as under a
// flood of one-shot cookies. B/session is the heap after the churn
// divided by max_
func BenchmarkTableChurn(b *testing.B) {
	sizes := []int{1_000_000}
	if os.Getenv("AFFINITY_BENCH_10M") != "" {
		sizes = append(sizes, 10_000_000)
	}
	for _, n := range sizes {
		b.Run(fmt.Sprintf("max_sessions=%d", n), func(b *testing.B) {
			rng := rand.New(rand.NewPCG(uint64(n), 13))
			for b.Loop() {
				before := heapInUse()
				tb := NewTable(n)
				bound := int(tb.perShard.Load()) * Shards
				for tb.Len() < bound*99/100 {
					for range 1000 {
						tb.Put(rng.Uint64(), 1, 0, 1200)
					}
				}
				full := heapInUse()
				for range 3 * n {
					tb.Put(rng.Uint64(), 1, 1, 1200)
				}
				churned := heapInUse()
				b.ReportMetric(float64(churned-before)/float64(n), "B/session")
				b.ReportMetric(float64(full-before)/(1<<20), "MiB-full")
				b.ReportMetric(float64(churned-before)/(1<<20), "MiB-churned")
				runtime.KeepAlive(tb)
			}
		})
	}
}

// heapInUse returns the heap in use after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}
