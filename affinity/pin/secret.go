package pin

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

// secretStorageKey is where a generated secret is kept in Caddy's storage.
const secretStorageKey = "caddy-affinity/pin-secret"

// MinSecretLen is the shortest secret that is not logged as weak: pins
// are HMACs, which a short secret lets a client forge by brute force.
const MinSecretLen = 16

// LoadSecret returns the configured secret (placeholders replaced) or,
// if none is configured, the one kept in storage (nil: the context's
// config has none), creating it under the storage lock so that two
// instances starting at once end up with the same secret.
func LoadSecret(ctx context.Context, storage certmagic.Storage, configured string, logger *zap.Logger) ([]byte, error) {
	if configured != "" {
		s := caddy.NewReplacer().ReplaceKnown(configured, "")
		if s == "" {
			return nil, fmt.Errorf("secret %q is empty once its placeholders are replaced", configured)
		}
		return []byte(s), nil
	}
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
	logger.Info("generated a pin secret and kept it in storage; instances sharing this storage accept each other's pins",
		zap.String("key", secretStorageKey))
	return b, nil
}

// MaxPreviousSecrets bounds previous_secrets: rotation needs one or two.
const MaxPreviousSecrets = 8

// LoadPreviousSecrets returns the configured previous secrets,
// placeholders replaced, the current secret's duplicates left out (an
// environment variable may name the same value).
func LoadPreviousSecrets(configured []string, current []byte) ([][]byte, error) {
	var out [][]byte
	for _, prev := range configured {
		s := caddy.NewReplacer().ReplaceKnown(prev, "")
		if s == "" {
			return nil, fmt.Errorf("previous secret %q is empty once its placeholders are replaced", prev)
		}
		if s == string(current) {
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

// OpenUpgradeWindow opens the upgrade window of old pins once per
// storage and returns when it opened, in table seconds: it reads when it
// opened, or records now if no instance did. Without storage (nil, or
// when it fails) the window opens at this process's start, as before
// (InUpgrade). Every later start on the storage finds the window closed,
// so that a current pin cut to an old one's length brings no new session
// to a draining upstream.
func OpenUpgradeWindow(ctx context.Context, storage certmagic.Storage, logger *zap.Logger) uint32 {
	if storage == nil {
		return processStart
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if b, err := storage.Load(sctx, pinUpgradeKey); err == nil {
		if since, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64); err == nil && since > 0 {
			return sessions.Seconds(time.Unix(since, 0))
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		logger.Warn("cannot read the pin upgrade window from storage; old pins count as live for one session_ttl after this start", zap.Error(err))
		return processStart
	}
	now := time.Now()
	if err := storage.Store(sctx, pinUpgradeKey, []byte(strconv.FormatInt(now.Unix(), 10))); err != nil {
		logger.Warn("cannot record the pin upgrade window in storage; old pins count as live for one session_ttl after this start", zap.Error(err))
		return processStart
	}
	return sessions.Seconds(now)
}
