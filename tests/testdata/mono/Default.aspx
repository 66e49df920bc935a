<%@ Page Language="C#" EnableSessionState="True" EnableViewState="false" %>
<%
	// The session counter lives in this process's memory only (InProc):
	// a request that reaches another worker finds no session.
	int n = Session["n"] == null ? 0 : (int) Session["n"];
	n++;
	Session["n"] = n;
	Response.ContentType = "text/plain";
	Response.Write("count=" + n +
		" worker=" + Environment.GetEnvironmentVariable("AFFINITY_MONO_WORKER") +
		" pid=" + System.Diagnostics.Process.GetCurrentProcess().Id +
		" session=" + Session.SessionID + "\n");
%>
