package sessions

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-affinity/caddy-affinity/internal/testredis"
)

// BenchmarkRedisFootprint measures what `store redis` costs Redis, for
// BENCHMARKS.md: bytes of Redis memory per live session (INFO memory
// used_memory after minus before, over the sessions) at 100k sessions
// (and 1M with AFFINITY_BENCH_1M=1), and commands per session over one
// session_ttl (INFO commandstats, every command but INFO) for sessions
// used on one instance, or alternating between two, a request per eighth
// of session_ttl, the table clock stepped by hand.
//
//	go test -run '^$' -bench RedisFootprint -benchtime 1x ./affinity/sessions/
func BenchmarkRedisFootprint(b *testing.B) {
	sizes := []int{100_000}
	if os.Getenv("AFFINITY_BENCH_1M") != "" {
		sizes = append(sizes, 1_000_000)
	}
	type size struct{ sessions, maxSessions int }
	var runs []size
	for _, n := range sizes {
		runs = append(runs, size{n, n})
	}
	// The default max_sessions (1M) with a tenth of it live: buckets
	// hold ~6 entries, their keys' overhead shared by fewer.
	runs = append(runs, size{100_000, 1_000_000})
	for _, sz := range runs {
		n := sz.sessions
		b.Run(fmt.Sprintf("bytes/sessions=%d/max_sessions=%d", n, sz.maxSessions), func(b *testing.B) {
			for b.Loop() {
				rd := testredis.Start(b)
				c := rd.Client()
				ids, _ := upstreams(&testing.T{}, 3)
				h := benchInstance(b, rd.Addr, sz.maxSessions)
				before := usedMemory(b, c)
				now := Now()
				for i := range n {
					h.Learn(uint64(i)*0x9e3779b97f4a7c15+1, ids[i%3], now, nil)
				}
				after := usedMemory(b, c)
				b.ReportMetric(float64(after-before)/float64(n), "B/session")
				c.Close()
				rd.Stop()
			}
		})
	}
	for _, instances := range []int{1, 2} {
		b.Run(fmt.Sprintf("commands/instances=%d", instances), func(b *testing.B) {
			for b.Loop() {
				b.ReportMetric(commandsPerSession(b, instances), "cmds/session/ttl")
			}
		})
	}
}

// commandsPerSession runs 10,000 sessions, issued by the app on instance
// x, then used by a request every eighth of session_ttl for one TTL, on
// x alone or alternating between y and x, and returns the Redis commands
// per session, the writes of the counts included.
func commandsPerSession(b *testing.B, instances int) float64 {
	rd := testredis.Start(b)
	defer rd.Stop()
	c := rd.Client()
	defer c.Close()
	ids, _ := upstreams(&testing.T{}, 3)
	const n, ttl = 10_000, 800
	x, y := benchInstanceTTL(b, rd.Addr, 2*n, ttl), benchInstanceTTL(b, rd.Addr, 2*n, ttl)
	start := Seconds(time.Now())
	SetClock(start)
	defer SetClock(0)
	before := allCommands(b, c)
	for i := range n {
		x.Learn(uint64(i)*0x9e3779b97f4a7c15+1, ids[i%3], start, nil)
	}
	for step := uint32(1); step <= 8; step++ {
		now := start + step*ttl/8
		SetClock(now)
		h := x
		if instances == 2 && step%2 == 1 {
			h = y
		}
		for i := range n {
			key := uint64(i)*0x9e3779b97f4a7c15 + 1
			id, ok := h.Lookup([]uint64{key}, Query{Now: now, LaterAliases: true}, func(uint32) bool { return true })
			if !ok || id != ids[i%3] {
				b.Fatalf("session %d lost at step %d", i, step)
			}
			h.Remember([]uint64{key}, id, now, nil)
		}
		// The farm's once-a-second refresh writes the counts (one
		// HINCRBY per generation, kind and dial, and their TTLs); here
		// once a step, as if the step's requests fell in one second.
		for _, h := range []*Handle{x, y} {
			h.remote.(*redisNS).flushCounts()
		}
	}
	return float64(allCommands(b, c)-before) / n
}

func benchInstance(b *testing.B, addr string, n int) *Handle {
	return benchInstanceTTL(b, addr, n, 1200)
}

func benchInstanceTTL(b *testing.B, addr string, n int, ttl uint32) *Handle {
	s := NewStore(n)
	b.Cleanup(s.Close)
	h, err := s.Open(Options{Config: &Config{Kind: KindRedis, RedisConn: RedisConn{Address: addr}, KeyPrefix: "caddy-affinity"},
		Scope: 1, Namespace: "site-0123456789abcdef", TTL: ttl, MaxSessions: n})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(h.Close)
	return h
}

func usedMemory(b *testing.B, c *redis.Client) int64 {
	info, err := c.Info(context.Background(), "memory").Result()
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "used_memory:"); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	b.Fatal("no used_memory")
	return 0
}

// allCommands returns the calls of every command but INFO.
func allCommands(b *testing.B, c *redis.Client) int64 {
	return commandCalls(b, c, func(name string) bool { return name != "info" })
}
