package sessions

import (
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-affinity/caddy-affinity/internal/redisconn"
)

// Kinds of session store (Config.Kind).
const (
	// KindLocal: the process's session table, written to Caddy's storage
	// periodically and on shutdown and read back at start, so that a
	// restart forgets no session. The default.
	KindLocal = "local"
	// KindMemory: the process's session table only, forgotten when the
	// process stops (the module's behaviour before stores existed).
	KindMemory = "memory"
	// KindRedis: a Redis server that every instance using it shares.
	KindRedis = "redis"
)

// Defaults of the stores.
const (
	// DefaultStoreInterval is how often `store local` writes the table
	// while it changes: what a crash (no shutdown) may lose.
	DefaultStoreInterval = caddy.Duration(30 * time.Second)
	// DefaultRedisKeyPrefix prefixes every key `store redis` writes.
	DefaultRedisKeyPrefix = "caddy-affinity"
	// DefaultRedisTimeout bounds the total a request waits for Redis,
	// whatever it asks (a lookup, then its writes). 500ms: at 50ms a
	// burst of 200 new sessions alternating between two instances on a
	// busy 2-core machine broke 12-14 sessions in 3 of 6 runs (slow
	// answers while connections are dialled and the CPU is contended),
	// at 500ms none in 4; a Redis that hangs costs a request at most this
	// once, and the circuit then skips Redis (see redisTrip).
	DefaultRedisTimeout = caddy.Duration(500 * time.Millisecond)
)

// minStoreInterval keeps a misconfigured interval from writing a large
// table to storage many times a second.
const minStoreInterval = time.Second

// RedisConn is how `store redis` reaches Redis: one server, Sentinel or
// Cluster, with credentials, db, tls and timeout (package redisconn owns
// these options, their checks and the client).
type RedisConn = redisconn.Config

// Config is where a policy's session memory lives besides the
// process: the `store` option. The zero value is `store local`.
//
// JSON: {"kind": "local", "interval": "30s"}, {"kind": "memory"} or
// {"kind": "redis", "key_prefix": "caddy-affinity", ...} with the
// connection's fields beside kind and key_prefix: one of
// "address": "127.0.0.1:6379",
// "sentinel_master": "mymaster", "sentinels": ["10.0.0.1:26379"] or
// "cluster": ["10.0.0.1:6379", "10.0.0.2:6379"], and "username",
// "password", "sentinel_password", "db", "tls", "timeout".
type Config struct {
	// Kind is "local" (default), "memory" or "redis".
	Kind string `json:"kind,omitempty"`

	// Interval (local) is how often the table is written to Caddy's
	// storage while it changes, besides on shutdown. Default 30s.
	Interval caddy.Duration `json:"interval,omitempty"`

	// RedisConn (redis) is where Redis is and how to reach it: its
	// fields (address, sentinel_master, sentinels, sentinel_password,
	// cluster, username, password, db, tls, timeout) sit beside kind.
	// Placeholders such as {env.REDIS_PASSWORD} are replaced at
	// provision time. Timeout bounds the total a request waits for
	// Redis, all its round trips together; past it the local table
	// decides alone. Default 500ms.
	RedisConn

	// KeyPrefix (redis) prefixes every key. Default "caddy-affinity".
	KeyPrefix string `json:"key_prefix,omitempty"`
}

// oneArg returns the line's one argument.
func oneArg(d *caddyfile.Dispenser) (string, error) {
	opt := d.Val()
	if !d.NextArg() {
		return "", d.Errf("store: %s: need a value", opt)
	}
	v := d.Val()
	if d.NextArg() {
		return "", d.Errf("store: %s: takes one value, got more (%q)", opt, d.Val())
	}
	return v, nil
}

// kind returns the store's kind, local when not set.
func (c *Config) kind() string {
	if c == nil || c.Kind == "" {
		return KindLocal
	}
	return c.Kind
}

// interval returns how often `store local` writes the table.
func (c *Config) interval() time.Duration {
	if c == nil || c.Interval == 0 {
		return time.Duration(DefaultStoreInterval)
	}
	return time.Duration(c.Interval)
}

// Validate checks the store's options.
func (c *Config) Validate() error {
	if c == nil {
		return nil
	}
	switch c.kind() {
	case KindLocal:
		if c.Interval != 0 && time.Duration(c.Interval) < minStoreInterval {
			return fmt.Errorf("store local: interval must be at least %s, got %s", minStoreInterval, time.Duration(c.Interval))
		}
		if c.hasRedisOptions() {
			return fmt.Errorf("store local: takes only interval; address, sentinel, cluster, username, password, db, tls, key_prefix and timeout are options of store redis")
		}
	case KindMemory:
		if c.Interval != 0 || c.hasRedisOptions() {
			return fmt.Errorf("store memory: takes no options")
		}
	case KindRedis:
		if c.Interval != 0 {
			return fmt.Errorf("store redis: interval is an option of store local")
		}
		if err := c.RedisConn.Validate(); err != nil {
			return fmt.Errorf("store redis: %w", err)
		}
	default:
		return fmt.Errorf("store: unknown kind %q (want local, memory or redis)", c.Kind)
	}
	return nil
}

// hasRedisOptions reports whether any option of store redis is set.
func (c *Config) hasRedisOptions() bool {
	r := &c.RedisConn
	return c.KeyPrefix != "" || r.Address != "" || r.SentinelMaster != "" || len(r.Sentinels) > 0 ||
		r.SentinelPassword != "" || len(r.Cluster) > 0 || r.Username != "" || r.Password != "" ||
		r.DB != 0 || r.TLS || r.Timeout != 0
}

// ParseCaddyfile parses a `store` line and its block:
//
//	store local [{
//		interval <duration>
//	}]
//	store memory
//	store redis [<host:port>] [{
//		sentinel <master_name> <sentinel_addr>...
//		sentinel_password <password>
//		cluster <node_addr>...
//		username <name>
//		password <password>
//		db <n>
//		tls
//		key_prefix <prefix>
//		timeout <duration>
//	}]
//
// store redis takes exactly one of the address, sentinel or cluster.
func ParseCaddyfile(d *caddyfile.Dispenser) (*Config, error) {
	if !d.NextArg() {
		return nil, d.Err("store: need a kind: local, memory or redis")
	}
	c := &Config{Kind: d.Val()}
	file, line := d.File(), d.Line()
	switch c.Kind {
	case KindLocal, KindMemory:
		if d.NextArg() {
			return nil, d.Errf("store %s: takes no arguments, got %q", c.Kind, d.Val())
		}
	case KindRedis:
		if d.NextArg() {
			c.Address = d.Val()
		}
		if d.NextArg() {
			return nil, d.Errf("store redis: takes one address, got more (%q); options go in a block", d.Val())
		}
	default:
		return nil, d.Errf("store: unknown kind %q (want local, memory or redis)", c.Kind)
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] {
			return nil, d.Errf("store %s: %s specified more than once", c.Kind, opt)
		}
		seen[opt] = true
		if c.Kind == KindMemory {
			return nil, d.Errf("store memory: takes no options, got %q", opt)
		}
		if c.Kind == KindLocal && opt != "interval" {
			return nil, d.Errf("store local: unrecognized option %q (want interval)", opt)
		}
		if c.Kind == KindRedis && opt != "key_prefix" {
			ok, err := c.RedisConn.UnmarshalOption(d)
			if err != nil {
				return nil, err
			}
			if !ok {
				return nil, d.Errf("store redis: unrecognized option %q (want sentinel, sentinel_password, cluster, username, password, db, tls, key_prefix or timeout)", opt)
			}
			continue
		}
		v, err := oneArg(d)
		if err != nil {
			return nil, err
		}
		switch opt {
		case "interval":
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur <= 0 {
				return nil, d.Errf("store local: interval: %q is not a positive duration", v)
			}
			if dur < minStoreInterval {
				return nil, d.Errf("store local: interval %q is too short, the least is %s", v, minStoreInterval)
			}
			c.Interval = caddy.Duration(dur)
		case "key_prefix":
			c.KeyPrefix = v
		}
	}
	if c.Kind == KindRedis {
		if err := c.RedisConn.Validate(); err != nil {
			return nil, fmt.Errorf("store redis: %v, at %s:%d", err, file, line)
		}
	}
	return c, nil
}
