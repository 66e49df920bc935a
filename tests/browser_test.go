package tests

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
)

// chromiumNames are the browser binaries looked for on PATH, Debian's
// first; AFFINITY_CHROMIUM names one explicitly.
var chromiumNames = []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless-shell"}

// findChromium returns a Chromium binary, or "".
func findChromium() string {
	if p := os.Getenv("AFFINITY_CHROMIUM"); p != "" {
		return p
	}
	for _, name := range chromiumNames {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// screenshotDir is where screenshots go: $AFFINITY_SCREENSHOT_DIR, so
// that a reviewer can look at them after the run, else the test's temp
// dir.
func screenshotDir(t *testing.T) string {
	if dir := os.Getenv("AFFINITY_SCREENSHOT_DIR"); dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	return t.TempDir()
}

// TestStatusPageInBrowser opens the status page in headless Chromium,
// as an operator types its URL, and drains an upstream with its button:
// the admin API then says it is draining and the page shows it, by its
// own refresh. It also runs a lookup from the page's form. It takes a
// screenshot for the reviewer.
func TestStatusPageInBrowser(t *testing.T) {
	needCaddy(t)
	bin := findChromium()
	if bin == "" {
		msg := fmt.Sprintf("SKIPPED TestStatusPageInBrowser: no Chromium found (looked for %s on PATH and $AFFINITY_CHROMIUM); "+
			"install it (Debian: apt-get install -y --no-install-recommends chromium) to test the status page in a browser",
			strings.Join(chromiumNames, ", "))
		fmt.Fprintf(os.Stderr, "\n!!!!!!!!!!\n!!! %s\n!!!!!!!!!!\n\n", msg)
		t.Skip(msg)
	}
	bs := startBackends(t, 3)
	p := startCaddy(t, "browser", proxyConfig{
		Upstreams: addrsOf(bs),
		Policy:    "key cookie " + appCookie,
	})
	// Some sessions, so that the page has something to show.
	clients := newClients(t, 12)
	expectClean(t, "visits", visitAll(clients, p.URL, 2, 6))
	// Session counts are exact when read; polling tolerates a slow machine.
	obsEventually(t, "sessions counted", 6*time.Second, func() (bool, string) {
		n := int64(0)
		for _, u := range obsUpstreams(t, p) {
			n += u.Sessions
		}
		return n == int64(len(clients)), fmt.Sprint(n)
	})
	// A browser typing the URL sends no Origin: the admin API needs the
	// README's origins line (see TestStatusPageAPI).
	obsAllowBrowsers(t, p)

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var browserOut syncBuffer
	actx, cancelAlloc := chromedp.NewExecAllocator(ctx,
		chromedp.ExecPath(bin),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 1000),
		chromedp.CombinedOutput(&browserOut),
	)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(actx)
	defer cancelBrowser()
	defer func() {
		if t.Failed() {
			t.Logf("chromium output:\n%s", tailLines(browserOut.String(), 40))
		}
	}()

	// Uncaught exceptions and console errors of the page's script fail
	// the test.
	var mu sync.Mutex
	var pageErrors []string
	if err := chromedp.Listen(bctx, func(ev any) {
		switch ev := ev.(type) {
		case *runtime.EventExceptionThrown:
			mu.Lock()
			d := ev.ExceptionDetails
			text := d.Text
			if d.Exception != nil {
				text += " " + d.Exception.Description
			}
			pageErrors = append(pageErrors, fmt.Sprintf("exception at %d:%d: %s", d.LineNumber+1, d.ColumnNumber+1, text))
			mu.Unlock()
		case *runtime.EventConsoleAPICalled:
			if ev.Type == runtime.ConsoleAPICalledTypeError {
				mu.Lock()
				var args []string
				for _, a := range ev.Args {
					args = append(args, a.Description+string(a.Value))
				}
				pageErrors = append(pageErrors, "console.error: "+strings.Join(args, " "))
				mu.Unlock()
			}
		}
	}); err != nil {
		t.Fatalf("starting Chromium (%s): %v\n%s", bin, err, browserOut.String())
	}

	page := p.Admin + "/affinity/"
	openStatusPage(t, bctx, page, 3)
	// Wait for one refresh of the script, so that what is clicked is the
	// script's own rendering too.
	if err := chromedp.Do(bctx, chromedp.Poll[chromedp.Void](
		`document.querySelector('#live').textContent === 'refreshes every 2 s' && document.querySelector('#upstreams td.since').title !== undefined`)); err != nil {
		t.Fatalf("the page's refresh: %v", err)
	}

	// Drain the busiest worker with its button.
	victim := backendNamed(bs, busiest(clients))
	row := fmt.Sprintf(`#upstreams tr[data-upstream=%q]`, victim.addr)
	if err := chromedp.Do(bctx, chromedp.Click(chromedp.CSS(row+` button[data-action="draining"]`))); err != nil {
		t.Fatalf("clicking drain for %s: %v", victim.addr, err)
	}
	obsEventually(t, "the admin API says "+victim.addr+" is draining", 10*time.Second, func() (bool, string) {
		u := obsUpstreams(t, p)[victim.addr]
		return u.State == "draining" && u.SetBy == "operator", fmt.Sprintf("%+v", u)
	})
	waitCtx, cancelWait := context.WithTimeout(bctx, 10*time.Second)
	defer cancelWait()
	if err := chromedp.Do(waitCtx, chromedp.WaitVisible(chromedp.CSS(row+`[data-state="draining"] td.state .badge.draining`))); err != nil {
		t.Fatalf("the page does not show %s draining: %v", victim.addr, err)
	}
	msg, err := chromedp.Run(bctx, chromedp.Text(chromedp.CSS(`#message`)))
	if err != nil || !strings.Contains(msg, fmt.Sprintf("%s is now draining: it keeps its %d live sessions", victim.addr, sessionsByWorker(clients)[victim.name])) {
		t.Errorf("status message %q (%v)", msg, err)
	}
	disabled, err := chromedp.Run(bctx, chromedp.Evaluate[bool](fmt.Sprintf(`document.querySelector(%q).disabled`, row+` button[data-action="draining"]`)))
	if err != nil || !disabled {
		t.Errorf("the drain button of a draining upstream is not disabled (%v)", err)
	}

	// A lookup from the form: a session of the drained worker stays.
	var sid string
	for _, c := range clients {
		if c.worker == victim.name {
			sid, _ = c.cookie(p.URL, appCookie)
			break
		}
	}
	if err := chromedp.Do(bctx,
		chromedp.SendKeys(chromedp.CSS(`#lookup input[name="key"]`), sid),
		chromedp.Click(chromedp.CSS(`#lookup button[type="submit"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#lookup-result`)),
	); err != nil {
		t.Fatalf("lookup form: %v", err)
	}
	result, err := chromedp.Run(bctx, chromedp.Poll[string](
		`document.querySelector('#lookup-result').textContent.includes('"decision"') && document.querySelector('#lookup-result').textContent`))
	if err != nil || !strings.Contains(result, `"decision": "session_table"`) || !strings.Contains(result, `"upstream": "`+victim.addr+`"`) {
		t.Errorf("lookup of a session on %s from the page: %v\n%s", victim.addr, err, result)
	}

	// Another worker dies: the page shows it down and its sessions'
	// failovers, by its own refresh.
	var dead *backend
	for _, b := range bs {
		if b != victim && sessionsByWorker(clients)[b.name] > 0 {
			dead = b
		}
	}
	if dead != nil {
		dead.kill()
		for _, c := range clients {
			if c.worker == dead.name {
				if r := c.visit(p.URL); r.failed() {
					t.Errorf("a session of the dead worker failed: %s", r)
				}
			}
		}
		deadRow := fmt.Sprintf(`#upstreams tr[data-upstream=%q]`, dead.addr)
		failoverRow := fmt.Sprintf(`[...document.querySelectorAll('#failovers tbody td')].some(td => td.textContent === %q)`, dead.addr)
		waitCtx, cancelWait := context.WithTimeout(bctx, 10*time.Second)
		defer cancelWait()
		if err := chromedp.Do(waitCtx,
			chromedp.WaitVisible(chromedp.CSS(deadRow+` td.health .down`)),
			chromedp.Poll[chromedp.Void](failoverRow),
		); err != nil {
			t.Errorf("the page does not show %s down with its failovers: %v", dead.addr, err)
		}
	}

	// The chart of the last 15 minutes, with the drain and the failovers
	// in it.
	checkStatusChart(t, bctx, p, bs, victim)

	// Let one more refresh render, then keep a picture of the page.
	time.Sleep(2200 * time.Millisecond)
	shot, err := chromedp.Run(bctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	path := filepath.Join(screenshotDir(t), "status-page.png")
	if err := os.WriteFile(path, shot, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot of the status page after draining %s: %s", victim.addr, path)

	mu.Lock()
	defer mu.Unlock()
	for _, e := range pageErrors {
		t.Errorf("page script error: %s", e)
	}
}

// statusHistory is the history in the JSON of GET /affinity/.
type statusHistory struct {
	FailoversTotal uint64 `json:"failovers_total"`
	History        *struct {
		Times     []time.Time `json:"times"`
		Upstreams []struct {
			Upstream string   `json:"upstream"`
			Sessions []*int64 `json:"sessions"`
		} `json:"upstreams"`
		Failovers []uint64 `json:"failovers"`
	} `json:"history"`
}

// checkStatusChart checks the status page's chart after sessions on
// every backend and a failover: the JSON carries the history, and the
// page draws a line with points for each upstream (dashed for the
// drained one) and a bar for the failovers. It waits for a second stored
// sample (15 s after the first), so that the failovers are in a sample
// and not only in the live point, and then keeps a picture of the chart.
func checkStatusChart(t *testing.T, bctx context.Context, p *caddyProc, bs []*backend, drained *backend) {
	t.Helper()
	var st statusHistory
	obsEventually(t, "two stored samples in the history", 25*time.Second, func() (bool, string) {
		st = statusHistory{}
		obsGetJSON(t, p.Admin+"/affinity/", &st)
		if st.History == nil {
			return false, "no history"
		}
		return len(st.History.Times) >= 3, fmt.Sprintf("%d points", len(st.History.Times))
	})
	h := st.History
	var charted uint64
	for _, f := range h.Failovers {
		charted += f
	}
	if st.FailoversTotal == 0 || charted != st.FailoversTotal {
		t.Errorf("the history charts %d failovers (%v), the process counts %d", charted, h.Failovers, st.FailoversTotal)
	}
	series := map[string]int{}
	for _, u := range h.Upstreams {
		if len(u.Sessions) != len(h.Times) {
			t.Errorf("%s: %d values for %d points", u.Upstream, len(u.Sessions), len(h.Times))
		}
		for _, v := range u.Sessions {
			if v != nil {
				series[u.Upstream]++
			}
		}
	}
	for _, b := range bs {
		if series[b.addr] < 2 {
			t.Errorf("the history has %d values for %s, want a series", series[b.addr], b.addr)
		}
	}
	t.Logf("history: %d points, failovers per point %v, values per upstream %v", len(h.Times), h.Failovers, series)

	// The page draws it on its next refresh.
	waitCtx, cancel := context.WithTimeout(bctx, 10*time.Second)
	defer cancel()
	drawn := fmt.Sprintf(`(() => {
		const lines = [...document.querySelectorAll('#chart polyline.series')];
		return lines.length === %d &&
			lines.every(l => l.getAttribute('points').trim().split(/\s+/).length >= 3) &&
			document.querySelectorAll('#chart rect.failover-bar').length >= 1 &&
			document.querySelectorAll('#chart-legend li[data-upstream]').length === %d;
	})()`, len(bs), len(bs))
	if err := chromedp.Do(waitCtx, chromedp.Poll[chromedp.Void](drawn)); err != nil {
		got, _ := chromedp.Run(bctx, chromedp.Evaluate[string](`document.querySelector('#chart').outerHTML`))
		t.Fatalf("the chart does not show a line per upstream and a failover bar: %v\n%s", err, got)
	}
	dashed, err := chromedp.Run(bctx, chromedp.Evaluate[string](fmt.Sprintf(
		`document.querySelector('#chart polyline[data-upstream=%q]').getAttribute('stroke-dasharray') || ''`, drained.addr)))
	if err != nil || dashed == "" {
		t.Errorf("the line of %s, draining, is not dashed (%q, %v)", drained.addr, dashed, err)
	}
	legend, _ := chromedp.Run(bctx, chromedp.Text(chromedp.CSS(`#chart-legend`)))
	t.Logf("chart legend: %s", strings.Join(strings.Fields(legend), " "))

	shot, err := chromedp.Run(bctx, chromedp.Screenshot(chromedp.CSS(`#history`)))
	if err != nil {
		t.Fatalf("screenshot of the chart: %v", err)
	}
	path := filepath.Join(screenshotDir(t), "status-chart.png")
	if err := os.WriteFile(path, shot, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot of the chart: %s", path)
}
