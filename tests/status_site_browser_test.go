package tests

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
)

// TestStatusPageThroughAffinityStatus serves the status page on a site
// route with the affinity_status directive behind basic_auth, as an
// operator exposing a dashboard would, and opens it in headless Chromium
// with the credentials: the page shows the upstreams, refreshes, and its
// drain button drains a worker (the admin API then says so). Without the
// credentials the route answers 401; a state change from another origin
// is refused with 403; and the page's polling adds no line to Caddy's
// log (it never touches the admin API).
func TestStatusPageThroughAffinityStatus(t *testing.T) {
	needCaddy(t)
	bctx := launchChromium(t)
	hash, err := exec.Command(caddyBin, "hash-password", "--plaintext", "s3cret").Output()
	if err != nil {
		t.Fatalf("caddy hash-password: %v", err)
	}
	bs := startBackends(t, 3)
	site := fmt.Sprintf("handle /ops/affinity/* {\nbasic_auth {\nops %s\n}\naffinity_status\n}", strings.TrimSpace(string(hash)))
	p := startCaddySite(t, "status-site", learnSite(addrsOf(bs), site, "key cookie "+appCookie))
	clients := newClients(t, 9)
	expectClean(t, "visits", visitAll(clients, p.URL, 2, 3))
	page := p.URL + "/ops/affinity/"

	// Without credentials: 401, nothing served.
	if status, _, _ := obsDo(t, http.MethodGet, page, nil); status != http.StatusUnauthorized {
		t.Fatalf("GET %s without credentials: %d, want 401", page, status)
	}
	auth := "Basic " + base64.StdEncoding.EncodeToString([]byte("ops:s3cret"))
	// A state change from another origin, with the credentials (a
	// browser that has them cached): refused.
	body := []byte(fmt.Sprintf(`{"upstream":%q,"state":"maintenance"}`, bs[0].addr))
	if status, _, b := obsDo(t, http.MethodPost, page+"upstreams/state", body, "Authorization: "+auth, "Origin: http://evil.example"); status != http.StatusForbidden {
		t.Fatalf("cross-origin POST: %d %s, want 403", status, b)
	}
	if u := obsUpstreams(t, p)[bs[0].addr]; u.State != "up" {
		t.Fatalf("after a refused POST, %s is %s", bs[0].addr, u.State)
	}

	if _, err := chromedp.Call(bctx, network.Enable, network.EnableParams{}); err != nil {
		t.Fatal(err)
	}
	if _, err := chromedp.Call(bctx, network.SetExtraHTTPHeaders, network.SetExtraHTTPHeadersParams{Headers: network.Headers{"Authorization": auth}}); err != nil {
		t.Fatal(err)
	}
	openStatusPage(t, bctx, page, 3)
	if err := chromedp.Do(bctx, chromedp.Poll[chromedp.Void](`document.querySelector('#live').textContent === 'refreshes every 2 s'`)); err != nil {
		live, _ := chromedp.Run(bctx, chromedp.Text(chromedp.CSS(`#live`)))
		t.Fatalf("the page's refresh through affinity_status: %v (%q)", err, live)
	}
	victim := bs[1]
	row := fmt.Sprintf(`#upstreams tr[data-upstream=%q]`, victim.addr)
	if err := chromedp.Do(bctx, chromedp.Click(chromedp.CSS(row+` button[data-action="draining"]`))); err != nil {
		t.Fatalf("clicking drain: %v", err)
	}
	obsEventually(t, "the admin API says "+victim.addr+" is draining", 10*time.Second, func() (bool, string) {
		u := obsUpstreams(t, p)[victim.addr]
		return u.State == "draining", fmt.Sprintf("%+v", u)
	})
	waitCtx, cancelWait := context.WithTimeout(bctx, 10*time.Second)
	defer cancelWait()
	if err := chromedp.Do(waitCtx, chromedp.WaitVisible(chromedp.CSS(row+`[data-state="draining"] td.state .badge.draining`))); err != nil {
		t.Fatalf("the page does not show %s draining: %v", victim.addr, err)
	}
	// A few more refreshes of the page: none of them is logged.
	logBefore := strings.Count(p.out.String(), "\n")
	time.Sleep(4500 * time.Millisecond)
	var logged []string
	for _, line := range strings.Split(p.out.String(), "\n")[logBefore:] {
		if strings.Contains(line, "/ops/affinity/") || strings.Contains(line, "received request") {
			logged = append(logged, line)
		}
	}
	if len(logged) != 0 {
		t.Errorf("the page's requests were logged (%d lines), want none:\n%s", len(logged), strings.Join(logged, "\n"))
	}
	if dir := os.Getenv("AFFINITY_SCREENSHOT_DIR"); dir != "" {
		if shot, err := chromedp.Run(bctx, chromedp.FullScreenshot(100)); err == nil {
			_ = os.WriteFile(dir+"/status-page-site.png", shot, 0o644)
		}
	}
}

// openStatusPage opens the status page at page in the browser and checks
// that it lists rows upstreams.
func openStatusPage(t *testing.T, bctx context.Context, page string, rows int) {
	t.Helper()
	if err := chromedp.Do(bctx,
		chromedp.Navigate(page),
		chromedp.WaitVisible(chromedp.CSS(`#upstreams tbody tr[data-upstream]`)),
	); err != nil {
		t.Fatalf("opening %s: %v", page, err)
	}
	n, err := chromedp.Run(bctx, chromedp.Evaluate[int](`document.querySelectorAll('#upstreams tbody tr[data-upstream]').length`))
	if err != nil || n != rows {
		t.Fatalf("%s shows %d upstream rows (%v), want %d", page, n, err, rows)
	}
}
