package affinity

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// storageOf returns the config's storage, or nil for a context that
// belongs to no config (Context.Storage panics on those; unit tests
// provision policies that way).
func storageOf(ctx caddy.Context) (s certmagic.Storage) {
	defer func() {
		if recover() != nil {
			s = nil
		}
	}()
	return ctx.Storage()
}

// secretStorageKey is where a generated secret is kept in Caddy's storage.
const secretStorageKey = "caddy-affinity/pin-secret"

// loadSecret returns the configured secret (placeholders replaced) or the
// one kept in Caddy's storage, creating it under the storage lock so that
// two instances starting at once end up with the same secret.
func (p *Policy) loadSecret(ctx caddy.Context) ([]byte, error) {
	if p.Secret != "" {
		s := caddy.NewReplacer().ReplaceKnown(p.Secret, "")
		if s == "" {
			return nil, fmt.Errorf("secret %q is empty once its placeholders are replaced", p.Secret)
		}
		return []byte(s), nil
	}
	storage := storageOf(ctx)
	if storage == nil {
		return nil, errors.New("no secret configured and no Caddy storage to keep a generated one")
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if b, err := storage.Load(sctx, secretStorageKey); err == nil && len(b) > 0 {
		return b, nil
	}
	if err := storage.Lock(sctx, secretStorageKey); err != nil {
		return nil, fmt.Errorf("locking storage for the pin secret: %v", err)
	}
	defer func() { _ = storage.Unlock(context.Background(), secretStorageKey) }()
	b, err := storage.Load(sctx, secretStorageKey)
	if err == nil && len(b) > 0 {
		return b, nil
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("loading the pin secret: %v", err)
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return nil, err
	}
	b = []byte(base64.RawURLEncoding.EncodeToString(raw))
	if err := storage.Store(sctx, secretStorageKey, b); err != nil {
		return nil, fmt.Errorf("storing the pin secret: %v", err)
	}
	p.logger.Info("generated a pin secret and kept it in storage; instances sharing this storage accept each other's pins",
		zap.String("key", secretStorageKey))
	return b, nil
}

// maxPreviousSecrets bounds previous_secrets: rotation needs one or two.
const maxPreviousSecrets = 8

// loadPreviousSecrets returns the previous secrets, placeholders
// replaced, the current secret's duplicates left out (an environment
// variable may name the same value).
func (p *Policy) loadPreviousSecrets() ([][]byte, error) {
	var out [][]byte
	for _, prev := range p.PreviousSecrets {
		s := caddy.NewReplacer().ReplaceKnown(prev, "")
		if s == "" {
			return nil, fmt.Errorf("previous secret %q is empty once its placeholders are replaced", prev)
		}
		if s == string(p.secret) {
			continue
		}
		out = append(out, []byte(s))
	}
	return out, nil
}
