package sessions

import (
	"fmt"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
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

// Config is where a policy's session memory lives besides the
// process: the `store` option. The zero value is `store local`.
//
// JSON: {"kind": "local", "interval": "30s"}, {"kind": "memory"} or
// {"kind": "redis", "address": "127.0.0.1:6379", "username": "...",
// "password": "{env.REDIS_PASSWORD}", "db": 0, "tls": true,
// "key_prefix": "caddy-affinity", "timeout": "500ms"}.
type Config struct {
	// Kind is "local" (default), "memory" or "redis".
	Kind string `json:"kind,omitempty"`

	// Interval (local) is how often the table is written to Caddy's
	// storage while it changes, besides on shutdown. Default 30s.
	Interval caddy.Duration `json:"interval,omitempty"`

	// Address (redis) is the server's host:port.
	Address string `json:"address,omitempty"`
	// Username and Password (redis) authenticate (ACL user, or password
	// alone for requirepass). Placeholders such as {env.REDIS_PASSWORD}
	// are replaced at provision time.
	Username string `json:"username,omitempty"`
	Password string `json:"password,omitempty"` //nolint:gosec // config field
	// DB (redis) is the database number. Default 0.
	DB int `json:"db,omitempty"`
	// TLS (redis) connects over TLS, verifying the server's certificate
	// against the system's roots.
	TLS bool `json:"tls,omitempty"`
	// KeyPrefix (redis) prefixes every key. Default "caddy-affinity".
	KeyPrefix string `json:"key_prefix,omitempty"`
	// Timeout (redis) bounds the total a request waits for Redis, all
	// its round trips together; past it the local table decides alone.
	// Default 500ms.
	Timeout caddy.Duration `json:"timeout,omitempty"`
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
		if c.Address != "" || c.Username != "" || c.Password != "" || c.DB != 0 || c.TLS || c.KeyPrefix != "" || c.Timeout != 0 {
			return fmt.Errorf("store local: takes only interval; address, username, password, db, tls, key_prefix and timeout are options of store redis")
		}
	case KindMemory:
		if *c != (Config{Kind: KindMemory}) {
			return fmt.Errorf("store memory: takes no options")
		}
	case KindRedis:
		if c.Address == "" {
			return fmt.Errorf("store redis: need the server's address (store redis 127.0.0.1:6379)")
		}
		if c.Interval != 0 {
			return fmt.Errorf("store redis: interval is an option of store local")
		}
		if c.DB < 0 {
			return fmt.Errorf("store redis: db must not be negative, got %d", c.DB)
		}
		if c.Timeout < 0 || time.Duration(c.Timeout) > 10*time.Second {
			return fmt.Errorf("store redis: timeout must be between 0 and 10s, got %s", time.Duration(c.Timeout))
		}
	default:
		return fmt.Errorf("store: unknown kind %q (want local, memory or redis)", c.Kind)
	}
	return nil
}

// ParseCaddyfile parses a `store` line and its block:
//
//	store local [{
//		interval <duration>
//	}]
//	store memory
//	store redis <host:port> [{
//		username <name>
//		password <password>
//		db <n>
//		tls
//		key_prefix <prefix>
//		timeout <duration>
//	}]
func ParseCaddyfile(d *caddyfile.Dispenser) (*Config, error) {
	if !d.NextArg() {
		return nil, d.Err("store: need a kind: local, memory or redis")
	}
	c := &Config{Kind: d.Val()}
	switch c.Kind {
	case KindLocal, KindMemory:
		if d.NextArg() {
			return nil, d.Errf("store %s: takes no arguments, got %q", c.Kind, d.Val())
		}
	case KindRedis:
		if !d.NextArg() {
			return nil, d.Err("store redis: need the server's address (store redis 127.0.0.1:6379)")
		}
		c.Address = d.Val()
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
		if opt == "tls" {
			if d.NextArg() {
				return nil, d.Errf("store redis: tls takes no value, got %q", d.Val())
			}
			c.TLS = true
			continue
		}
		v, err := oneArg(d)
		if err != nil {
			return nil, err
		}
		switch opt {
		case "interval", "timeout":
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur <= 0 {
				return nil, d.Errf("store %s: %s: %q is not a positive duration", c.Kind, opt, v)
			}
			if opt == "interval" {
				if dur < minStoreInterval {
					return nil, d.Errf("store local: interval %q is too short, the least is %s", v, minStoreInterval)
				}
				c.Interval = caddy.Duration(dur)
			} else {
				if dur > 10*time.Second {
					return nil, d.Errf("store redis: timeout %q is too long, the most is 10s", v)
				}
				c.Timeout = caddy.Duration(dur)
			}
		case "username":
			c.Username = v
		case "password":
			c.Password = v
		case "db":
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return nil, d.Errf("store redis: db: %q is not a whole number >= 0", v)
			}
			c.DB = n
		case "key_prefix":
			c.KeyPrefix = v
		default:
			return nil, d.Errf("store redis: unrecognized option %q (want username, password, db, tls, key_prefix or timeout)", opt)
		}
	}
	return c, nil
}
