package affinity

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
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

// pinUpgradeKey is where the start of the upgrade window of old (v1, v2)
// pins is kept in Caddy's storage: unix seconds, written by the first v3
// instance that starts on the storage and never again.
const pinUpgradeKey = "caddy-affinity/pin-v3-since"

// loadPinUpgrade opens the upgrade window of old pins once per storage:
// it reads when it opened, or records now if no instance did. Without
// storage (or when it fails) the window opens at this process's start,
// as before (inPinUpgrade). Every later start on the storage finds the
// window closed, so that a current pin cut to an old one's length
// brings no new session to a draining upstream.
func (p *Policy) loadPinUpgrade(ctx caddy.Context) {
	storage := storageOf(ctx)
	if storage == nil {
		return
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if b, err := storage.Load(sctx, pinUpgradeKey); err == nil {
		if since, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64); err == nil && since > 0 {
			pinUpgradeStart.Store(sessions.Seconds(time.Unix(since, 0)))
			return
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		p.logger.Warn("cannot read the pin upgrade window from storage; old pins count as live for one session_ttl after this start", zap.Error(err))
		return
	}
	now := time.Now()
	if err := storage.Store(sctx, pinUpgradeKey, []byte(strconv.FormatInt(now.Unix(), 10))); err != nil {
		p.logger.Warn("cannot record the pin upgrade window in storage; old pins count as live for one session_ttl after this start", zap.Error(err))
		return
	}
	pinUpgradeStart.Store(sessions.Seconds(now))
}
