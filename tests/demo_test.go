package tests

import (
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/cookiejar"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDemo runs `caddy affinity demo` as the README's first command does,
// with HOME, the XDG folders and TMPDIR pointed at empty temp dirs:
//   - 30 fresh clients from one machine (all from 127.0.0.1, each a new
//     connection and cookie jar) land on all three workers, and each keeps
//     its worker for 4 visits;
//   - `caddy affinity status` and the status JSON add no line to its log;
//   - the demo's storage is a folder under TMPDIR while it runs, and after
//     it stops HOME (with the XDG folders) and TMPDIR are empty: it wrote
//     nothing of the user's and removed its own.
func TestDemo(t *testing.T) {
	needCaddy(t)
	home, tmp := t.TempDir(), t.TempDir()
	proxyPort, adminPort, controlPort := freePort(t), freePort(t), freePort(t)
	proxy := fmt.Sprintf("http://127.0.0.1:%d", proxyPort)
	cmd := exec.Command(caddyBin, "affinity", "demo",
		"--listen", fmt.Sprintf("127.0.0.1:%d", proxyPort),
		"--admin", fmt.Sprintf("127.0.0.1:%d", adminPort),
		"--control", fmt.Sprintf("127.0.0.1:%d", controlPort),
		"--first-port", "0")
	cmd.Dir = tmp
	cmd.Env = append(isolatedEnv(home), "TMPDIR="+tmp)
	out := new(syncBuffer)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		_ = cmd.Process.Signal(syscall.SIGINT)
		select {
		case err := <-exited:
			return err
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			return fmt.Errorf("the demo did not stop within 15 s of SIGINT")
		}
	}
	t.Cleanup(func() {
		_ = stop()
		if t.Failed() {
			t.Logf("---- demo output:\n%s", tailLines(out.String(), 80))
		}
	})

	// Ready when it printed its summary and the proxy answers.
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(out.String(), "Ctrl-C stops the demo") {
		if time.Now().After(deadline) {
			t.Fatal("the demo did not start within 30 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	m := regexp.MustCompile(`(?m)^  storage +(\S+)`).FindStringSubmatch(out.String())
	if m == nil || !strings.HasPrefix(m[1], tmp+string(filepath.Separator)) {
		t.Fatalf("the demo's storage %v is not a folder under TMPDIR %s", m, tmp)
	}

	const nClients, nVisits = 30, 4
	perWorker := map[string]int{}
	for i := range nClients {
		jar, _ := cookiejar.New(nil)
		tr := &http.Transport{Proxy: nil, DisableCompression: true}
		c := &http.Client{Jar: jar, Transport: tr, Timeout: 10 * time.Second}
		first := ""
		for v := 1; v <= nVisits; v++ {
			r := readVisit(c.Get(proxy + "/"))
			if r.failed() {
				t.Fatalf("client %d visit %d: %v", i, v, r)
			}
			if v == 1 {
				first = r.Worker
			}
			if r.Worker != first || r.Visits != v {
				t.Fatalf("client %d visit %d: %s, want %s%d: the session did not stick", i, v, r, first, v)
			}
		}
		tr.CloseIdleConnections()
		perWorker[first]++
	}
	t.Logf("30 new sessions from 127.0.0.1 per worker: %v", perWorker)
	for _, w := range []string{"A", "B", "C"} {
		if perWorker[w] == 0 {
			t.Errorf("no new session on worker %s (%v): sessions from one machine do not spread", w, perWorker)
		}
	}
	// The storage is in use (the generated pin secret is there).
	if entries, err := os.ReadDir(m[1]); err != nil || len(entries) == 0 {
		t.Errorf("the demo's storage %s is empty or gone while it runs (%v)", m[1], err)
	}
	// Its switch answers, and lists the workers' sessions.
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/__demo/", controlPort))
	if err != nil {
		t.Fatal(err)
	}
	var ws []struct {
		Sessions int `json:"sessions"`
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err := json.Unmarshal(body, &ws); err != nil || len(ws) != 3 {
		t.Fatalf("the switch's listing: %v %s", err, body)
	}

	// Quiet: the status page's JSON and `caddy affinity status` through
	// the admin API add no line to the demo's log.
	logBefore := len(out.String())
	if code, _, _ := runCLI(t, "affinity", "status", "--address", fmt.Sprintf("127.0.0.1:%d", adminPort)); code != 0 {
		t.Errorf("caddy affinity status against the demo: exit %d", code)
	}
	var st map[string]any
	obsGetJSON(t, fmt.Sprintf("http://127.0.0.1:%d/affinity/", adminPort), &st)
	if logged := out.String()[logBefore:]; logged != "" {
		t.Errorf("status requests were logged by the demo:\n%s", logged)
	}

	if err := stop(); err != nil {
		t.Fatalf("the demo's exit: %v", err)
	}
	for _, dir := range []string{home, tmp} {
		var left []string
		_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if path != dir {
				left = append(left, path)
			}
			return nil
		})
		if len(left) != 0 {
			t.Errorf("the demo left files behind in %s: %v", dir, left)
		}
	}
}
