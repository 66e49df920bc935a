package tests

import (
	"strings"
	"testing"
)

// A config that cannot work says so: the pin cookie off with the app's
// cookie as the key, but no affinity_learn, loses sessions (551 of 3000
// visits broke when tried) without any error. The first request it serves
// logs one warning; the status page and `caddy affinity status` show it.
func TestMissingLearnerIsTold(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddySite(t, "nolearner", learnSite(addrsOf(bs), "", "key cookie "+appCookie+"\npin_cookie off"))
	type status struct {
		Policies []struct {
			Warnings []string `json:"warnings"`
		} `json:"policies"`
	}
	// Sessions break here: that is what the warning is about.
	visitAll(newClients(t, 4), p.URL, 2, 4)
	var st status
	obsGetJSON(t, p.Admin+"/affinity/", &st)
	if len(st.Policies) != 1 || len(st.Policies[0].Warnings) != 1 || !strings.Contains(st.Policies[0].Warnings[0], "add the line `affinity_learn`") {
		t.Fatalf("status page warnings: %+v", st.Policies[0].Warnings)
	}
	if n := strings.Count(p.out.String(), "no affinity_learn handler runs before this reverse_proxy"); n != 1 {
		t.Errorf("logged the warning %d times, want once", n)
	}
	code, out, _ := runCLI(t, "affinity", "status", "--address", strings.TrimPrefix(p.Admin, "http://"))
	if code != 0 || !strings.Contains(out, "WARNING") || !strings.Contains(out, "affinity_learn") {
		t.Fatalf("caddy affinity status (exit %d):\n%s", code, out)
	}

	// With the learner, no warning.
	bs2 := startBackends(t, 3)
	p2 := startCaddySite(t, "learner", learnSite(addrsOf(bs2), "affinity_learn", "key cookie "+appCookie+"\npin_cookie off"))
	expectClean(t, "visits with the learner", visitAll(newClients(t, 4), p2.URL, 2, 4))
	var st2 status
	obsGetJSON(t, p2.Admin+"/affinity/", &st2)
	if len(st2.Policies) != 1 || len(st2.Policies[0].Warnings) != 0 {
		t.Fatalf("a warning with the learner in place: %+v", st2.Policies)
	}
}
