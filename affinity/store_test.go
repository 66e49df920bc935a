package affinity

import (
	"context"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// TestStoreLocalPersists goes through Caddy's file storage: a policy
// with store local on a fresh farm writes the table when it lets go (the
// process stops), and the next farm reads it back at provision time,
// naming upstreams by their dials.
func TestStoreLocalPersists(t *testing.T) {
	storage := &certmagic.FileStorage{Path: t.TempDir()}
	provision := func() *Policy {
		p := &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}, DisablePinCookie: true, Scope: "store-test"}
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		t.Cleanup(cancel)
		p.ctx = ctx
		if err := p.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// Provision's storage is the config's, which unit tests have not:
	// hand the farm the test's.
	start := func() *Policy {
		p := provision()
		p.sessions.PersistTo(storage, time.Hour)
		return p
	}
	p := start()
	pool := testPool(t, 3)
	ps := p.poolState(pool)
	now := sessions.Now()
	p.resolveScope(now)
	key := p.tableKey(12345)
	p.table.Put(key, ps.Recs[2].ID, now, 600)
	if err := p.Cleanup(); err != nil { // the last policy: the farm stops
		t.Fatal(err)
	}
	if b, err := storage.Load(context.Background(), sessions.SnapshotStorageKey); err != nil || len(b) == 0 {
		t.Fatalf("no snapshot written at shutdown: %v", err)
	}

	p2 := start()
	defer p2.Cleanup()
	if p2.table == p.table {
		t.Fatal("the farm did not start afresh")
	}
	e, ok := p2.table.Peek(key, now)
	if !ok || e.Upstream() != ps.Recs[2].ID {
		t.Fatalf("after the restart: %+v, %v; want upstream %d (%s)", e, ok, ps.Recs[2].ID, ps.Recs[2].Dial)
	}
}

func TestStoreCaddyfile(t *testing.T) {
	good := map[string]sessions.Config{
		"store local":                      {Kind: "local"},
		"store local {\n interval 10s\n }": {Kind: "local", Interval: caddy.Duration(10 * time.Second)},
		"store memory":                     {Kind: "memory"},
		"store redis 127.0.0.1:6379":       {Kind: "redis", RedisConn: sessions.RedisConn{Address: "127.0.0.1:6379"}},
		"store redis r:6379 {\n username u\n password {env.REDIS_PASSWORD}\n db 2\n tls\n key_prefix x\n timeout 20ms\n }": {
			Kind: "redis", KeyPrefix: "x", RedisConn: sessions.RedisConn{Address: "r:6379", Username: "u", Password: "{env.REDIS_PASSWORD}", DB: 2, TLS: true,
				Timeout: caddy.Duration(20 * time.Millisecond)}},
		"store redis {\n sentinel m 10.0.0.1:26379 10.0.0.2:26379\n sentinel_password sp\n password p\n key_prefix k\n }": {
			Kind: "redis", KeyPrefix: "k", RedisConn: sessions.RedisConn{SentinelMaster: "m", Sentinels: []string{"10.0.0.1:26379", "10.0.0.2:26379"},
				SentinelPassword: "sp", Password: "p"}},
		"store redis {\n cluster a:1 b:2\n tls\n }": {Kind: "redis", RedisConn: sessions.RedisConn{Cluster: []string{"a:1", "b:2"}, TLS: true}},
	}
	for line, want := range good {
		p, err := parse("affinity {\n key cookie sid\n " + line + "\n}")
		if err != nil {
			t.Errorf("%q: %v", line, err)
			continue
		}
		if p.Store == nil || !reflect.DeepEqual(*p.Store, want) {
			t.Errorf("%q: got %+v, want %+v", line, p.Store, want)
		}
		if err := p.Store.Validate(); err != nil {
			t.Errorf("%q: Validate: %v", line, err)
		}
	}
	bad := map[string]string{
		"store":                                                 "need a kind",
		"store disk":                                            "unknown kind",
		"store local 1":                                         "no arguments",
		"store local {\n interval 10ms\n }":                     "too short",
		"store local {\n db 1\n }":                              "unrecognized option",
		"store memory {\n interval 1s\n }":                      "takes no options",
		"store redis":                                           "need where Redis is",
		"store redis {\n sentinel m\n }":                        "need at least one sentinel",
		"store redis {\n sentinel m a\n }":                      "not host:port",
		"store redis a:1 {\n cluster b:2\n }":                   "not several",
		"store redis {\n cluster a:1\n db 1\n }":                "only database 0",
		"store redis {\n cluster a:1\n sentinel_password x\n }": "needs `sentinel",
		"store redis a:1 b:2":                                   "takes one address",
		"store redis a:1 {\n db -1\n }":                         "db",
		"store redis a:1 {\n timeout 1m\n }":                    "too long",
		"store redis a:1 {\n tls yes\n }":                       "tls takes no value",
		"store redis a:1 {\n db 1\n db 2\n }":                   "more than once",
		"store redis a:1 {\n color blue\n }":                    "unrecognized option",
		"store local\n store memory":                            "more than once",
	}
	for line, want := range bad {
		_, err := parse("affinity {\n key cookie sid\n " + line + "\n}")
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "Testfile:") {
			t.Errorf("%q: error %v, want one with %q and the line", line, err, want)
		}
	}
	var fromJSON sessions.Config
	if err := json.Unmarshal([]byte(`{"kind": "redis", "cluster": ["a:1", "b:2"], "password": "p", "key_prefix": "x"}`), &fromJSON); err != nil {
		t.Fatal(err)
	}
	if want := (sessions.Config{Kind: "redis", KeyPrefix: "x", RedisConn: sessions.RedisConn{Cluster: []string{"a:1", "b:2"}, Password: "p"}}); !reflect.DeepEqual(fromJSON, want) {
		t.Errorf("JSON: got %+v, want %+v", fromJSON, want)
	}
	if err := fromJSON.Validate(); err != nil {
		t.Errorf("JSON: Validate: %v", err)
	}
	for _, c := range []sessions.Config{{Kind: "disk"}, {Kind: "memory", Interval: 1}, {Kind: "local", RedisConn: sessions.RedisConn{Address: "x"}}, {Kind: "redis"}} {
		if err := c.Validate(); err == nil {
			t.Errorf("%+v: valid", c)
		}
	}
}
