package hashring

import (
	"fmt"
	"testing"
)

// BenchmarkScale shows how the ring's costs grow with the number of
// members, next to Caddy's rendezvous hashing (hostByHashing, see
// bench_test.go), for BENCHMARKS.md:
//
//	go test -run '^$' -bench Scale -benchmem -count 5 ./hashring/
//
// build is New (paid on every change of the member set); lookup hashes a
// 32-byte key and reads the table, as a request placing a new session
// does; rendezvous hashes the key with every member's name.
func BenchmarkScale(b *testing.B) {
	keys := benchKeys()
	for _, n := range []int{3, 16, 64, 256, 1000} {
		ms := upstreams(n)
		b.Run(fmt.Sprintf("build/N=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := New(ms); err != nil {
					b.Fatal(err)
				}
			}
		})
		r := mustNew(b, ms)
		b.Run(fmt.Sprintf("lookup/N=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				sink += r.Lookup(HashString(keys[i%len(keys)]))
				i++
			}
		})
		pool := make([]*rvUpstream, n)
		for i, m := range ms {
			pool[i] = &rvUpstream{Dial: m.Name, healthy: true}
		}
		b.Run(fmt.Sprintf("rendezvous/N=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if up := hostByHashing(pool, keys[i%len(keys)]); up != nil {
					sink++
				}
				i++
			}
		})
	}
}
