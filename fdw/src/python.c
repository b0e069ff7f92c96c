/*-------------------------------------------------------------------------
 *
 * python.c
 *		  The embedded interpreter: start-up, the GIL, signals, turning
 *		  Python exceptions into SQL errors, and the built-in module
 *		  _llmfdw_host through which FDW code talks back to Postgres.
 *
 * Differences from Multicorn2, on purpose:
 *	- Python never installs signal handlers (Postgres owns SIGINT/SIGTERM).
 *	- The GIL is released whenever control is back in Postgres, so Python
 *	  threads (gRPC's) keep running between rows.
 *	- Signals are blocked while Python runs and let through only when FDW
 *	  code polls _llmfdw_host.interrupt_pending(), so a cancel is seen by the
 *	  main thread at a poll point, never by a Python thread.
 *	- log_to_postgres(CRITICAL) is an ERROR, not a FATAL that ends the session.
 *	- Text is converted between the database encoding and Python str at
 *	  every crossing (see "Text between the server encoding and Python str").
 *	- The traceback of an unexpected exception goes to the server log, not
 *	  to the client.
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include <dirent.h>
#include <pthread.h>
#include <signal.h>

#include "access/xact.h"
#include "commands/dbcommands.h"
#include "lib/stringinfo.h"
#include "libpq/libpq.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/varlena.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

static bool python_ready = false;

/* ---------------------------------------------------------------------
 * GIL and signals
 * --------------------------------------------------------------------- */

void
llmfdw_enter(LlmfdwPyState *st)
{
	sigset_t	all;

	llmfdw_python_init();
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &st->saved_mask);
	st->gil = PyGILState_Ensure();
	st->held = true;
}

void
llmfdw_leave(LlmfdwPyState *st)
{
	if (!st->held)
		return;
	st->held = false;
	PyGILState_Release(st->gil);
	pthread_sigmask(SIG_SETMASK, &st->saved_mask, NULL);
}

/* ---------------------------------------------------------------------
 * Text between the server encoding and Python str
 *
 * Every string that crosses between Postgres and Python goes through these
 * functions.  Postgres strings are in the database encoding; Python's C API
 * speaks UTF-8.  So Postgres -> Python converts the server encoding to UTF-8
 * and Python -> Postgres converts UTF-8 to the server encoding, and a
 * character the database encoding cannot hold is a clear SQL error
 * (SQLSTATE 22P05), never a crash and never a silent substitution.  Only log
 * and error text, which must always get through, writes such characters as
 * \uXXXX escapes instead (see py_message).
 *
 * SQL_ASCII: Postgres does no conversion there and stores any byte but NUL.
 * We take the bytes as UTF-8, which is what such databases hold in practice,
 * with errors='surrogateescape' both ways: bytes that are not valid UTF-8
 * reach Python as lone surrogates (U+DC80..U+DCFF) and go back to Postgres as
 * the very same bytes, so nothing is refused or altered on the way through.
 * FDW code that sends such a string elsewhere (gRPC) gets Python's own
 * UnicodeEncodeError for it.
 * --------------------------------------------------------------------- */

static inline bool
sql_ascii(void)
{
	return GetDatabaseEncoding() == PG_SQL_ASCII;
}

/* Postgres's text as Python sees it in error messages: lossy, never fails. */
static PyObject *
lossy_text(const char *s)
{
	if (s == NULL)
		Py_RETURN_NONE;
	return PyUnicode_DecodeUTF8(s, strlen(s), "replace");
}

/*
 * Turn the Postgres error being handled into a pending Python exception.
 * Call in a PG_CATCH block, after switching back to the memory context saved
 * before PG_TRY, with the GIL held.  The exception is a
 * multicorn.utils.MulticornException carrying the error's message, detail,
 * hint and SQLSTATE, so that if the FDW code lets it propagate,
 * llmfdw_raise_python_error reports the original error unchanged.
 *
 * The message is decoded as UTF-8 with errors='replace': Postgres's own
 * messages are ASCII unless translated, and this must not fail in turn.
 */
static void
set_python_error_from_pg(void)
{
	ErrorData  *edata = CopyErrorData();
	PyObject   *cls;
	PyObject   *message;
	PyObject   *exc = NULL;

	FlushErrorState();

	message = lossy_text(edata->message);
	cls = message ? llmfdw_import_attr("multicorn.utils", "MulticornException") : NULL;
	if (cls != NULL)
	{
		PyObject   *hint = lossy_text(edata->hint);
		PyObject   *detail = lossy_text(edata->detail);
		PyObject   *sqlstate = PyUnicode_FromString(unpack_sql_state(edata->sqlerrcode));

		if (hint && detail && sqlstate)
			exc = PyObject_CallFunctionObjArgs(cls, message, hint, detail, sqlstate, NULL);
		Py_XDECREF(hint);
		Py_XDECREF(detail);
		Py_XDECREF(sqlstate);
		Py_DECREF(cls);
	}
	if (exc != NULL)
	{
		PyErr_SetObject((PyObject *) Py_TYPE(exc), exc);
		Py_DECREF(exc);
	}
	else if (message != NULL)
	{
		/* multicorn.utils not importable: keep at least the message. */
		PyErr_Clear();
		PyErr_SetObject(PyExc_RuntimeError, message);
	}
	/* else: a MemoryError is already set */
	Py_XDECREF(message);
	FreeErrorData(edata);
}

/*
 * Text in the server encoding (len bytes, or up to the NUL if len < 0) as a
 * new Python str.  Returns NULL with a Python exception set on failure; never
 * raises a Postgres ERROR, so it is safe with the GIL held, also inside a
 * function that Python calls.
 */
PyObject *
llmfdw_text_to_python(const char *s, int len)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	char	   *volatile utf8 = NULL;
	PyObject   *result;

	if (len < 0)
		len = strlen(s);
	if (sql_ascii())
		return PyUnicode_DecodeUTF8(s, len, "surrogateescape");

	PG_TRY();
	{
		utf8 = pg_server_to_any(s, len, PG_UTF8);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcontext);
		set_python_error_from_pg();
	}
	PG_END_TRY();
	if (utf8 == NULL)
		return NULL;

	result = PyUnicode_DecodeUTF8(utf8, utf8 == s ? len : strlen(utf8), "strict");
	if (utf8 != s)
		pfree(utf8);
	return result;
}

/*
 * Append a Python str to buf as UTF-8 (surrogateescape in SQL_ASCII, see
 * above).  Returns false with a Python exception set, for instance when obj
 * is not a str.
 */
bool
llmfdw_python_to_utf8(PyObject *obj, StringInfo buf)
{
	PyObject   *bytes;

	if (!sql_ascii())
	{
		Py_ssize_t	len;
		const char *utf8 = PyUnicode_AsUTF8AndSize(obj, &len);

		if (utf8 == NULL)
			return false;
		appendBinaryStringInfo(buf, utf8, len);
		return true;
	}
	if (!PyUnicode_Check(obj))
	{
		PyErr_Format(PyExc_TypeError, "expected str, not %s", Py_TYPE(obj)->tp_name);
		return false;
	}
	bytes = PyUnicode_AsEncodedString(obj, "utf-8", "surrogateescape");
	if (bytes == NULL)
		return false;
	appendBinaryStringInfo(buf, PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes));
	Py_DECREF(bytes);
	return true;
}

/*
 * UTF-8 text that came from Python (as llmfdw_python_to_utf8 writes it) in
 * the server encoding: s itself when nothing needs converting, else a
 * palloc'd copy.  Raises a Postgres ERROR when the database encoding cannot
 * hold a character ("character with byte sequence 0xe2 0x82 0xac in encoding
 * "UTF8" has no equivalent in encoding "LATIN1"") or the text has a NUL, so
 * call it without the GIL, or through llmfdw_python_to_server.
 */
char *
llmfdw_utf8_to_server(const char *s, int len)
{
	if (sql_ascii())
	{
		/* No conversion: SQL_ASCII stores the bytes as they are, but no NUL. */
		(void) pg_verify_mbstr(PG_SQL_ASCII, s, len, false);
		return unconstify(char *, s);
	}
	return pg_any_to_server(s, len, PG_UTF8);
}

/*
 * A Python str as a palloc'd, NUL-terminated string in the server encoding.
 * Returns NULL with a Python exception set (a MulticornException with
 * SQLSTATE 22P05 when the database encoding cannot hold a character).  Safe
 * with the GIL held.
 */
char *
llmfdw_python_to_server(PyObject *obj)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	StringInfoData buf;
	char	   *volatile result = NULL;

	initStringInfo(&buf);
	if (!llmfdw_python_to_utf8(obj, &buf))
	{
		pfree(buf.data);
		return NULL;
	}
	PG_TRY();
	{
		result = llmfdw_utf8_to_server(buf.data, buf.len);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcontext);
		set_python_error_from_pg();
	}
	PG_END_TRY();
	if (result != buf.data)
		pfree(buf.data);
	return result;
}

/*
 * str(obj) in the server encoding for log and error text, or NULL for None.
 * Such text must always get through, so characters the database encoding
 * cannot hold become \uXXXX escapes here instead of an error.  GIL held;
 * never leaves a Python exception set.
 */
static char *
py_message(PyObject *obj)
{
	PyObject   *s;
	char	   *result;

	if (obj == NULL || obj == Py_None)
		return NULL;
	s = PyObject_Str(obj);
	if (s == NULL)
	{
		PyErr_Clear();
		return NULL;
	}
	result = llmfdw_python_to_server(s);
	if (result == NULL)
	{
		/* ASCII is valid in every server encoding. */
		PyObject   *ascii = PyUnicode_AsEncodedString(s, "ascii", "backslashreplace");

		PyErr_Clear();
		if (ascii != NULL)
			result = pstrdup(PyBytes_AS_STRING(ascii));
		else
			PyErr_Clear();
		Py_XDECREF(ascii);
	}
	Py_DECREF(s);
	return result;
}

/* ---------------------------------------------------------------------
 * The _llmfdw_host module
 * --------------------------------------------------------------------- */

/*
 * client_connection_check_interval: Postgres's timer only sets
 * CheckClientConnectionPending, and ProcessInterrupts looks at the socket.  A
 * backend waiting on the sidecar runs no CHECK_FOR_INTERRUPTS, so look here,
 * as ProcessInterrupts does (a poll that does not wait): a backend whose
 * client went away then ends its query ("connection to client lost") instead
 * of decoding until it sends the result.  An error from the poll itself
 * (epoll failing) counts as "still connected": nothing may longjmp here.
 */
static void
check_client_connection(void)
{
	MemoryContext cxt = CurrentMemoryContext;
	bool		alive = true;

	if (!CheckClientConnectionPending || ClientConnectionLost)
		return;
	CheckClientConnectionPending = false;
	if (client_connection_check_interval <= 0)
		return;
	PG_TRY();
	{
		alive = pq_check_connection();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
	}
	PG_END_TRY();
	if (alive)
		enable_timeout_after(CLIENT_CONNECTION_CHECK_TIMEOUT, client_connection_check_interval);
	else
	{
		ClientConnectionLost = true;
		InterruptPending = true;
	}
}

/* Whether an interrupt that ends the query is pending (flags only: no signal is let through). */
static bool
stop_requested(void)
{
	return InterruptPending && (QueryCancelPending || ProcDiePending || ClientConnectionLost);
}

/*
 * Lets blocked signals through for a moment (their handlers only set flags),
 * then reports whether Postgres wants this query to stop.  Safe with the GIL
 * held: nothing here longjmps.  The caller, on true, sets a Python exception
 * (multicorn.utils.QueryCanceled) and unwinds; the host then turns the
 * pending interrupt into Postgres's own error ("canceling statement due
 * to ...").
 */
bool
llmfdw_interrupt_pending(void)
{
	sigset_t	blocked;
	sigset_t	saved;

	sigfillset(&blocked);
	pthread_sigmask(SIG_UNBLOCK, &blocked, &saved);
	pthread_sigmask(SIG_SETMASK, &saved, NULL);

	/*
	 * A backend waiting on the sidecar is not in WaitLatch, so it would not
	 * notice that the postmaster died: treat that as a request to exit (the
	 * host's error path then ends the session, as WL_EXIT_ON_PM_DEATH does).
	 */
	if (!PostmasterIsAlive())
	{
		ProcDiePending = true;
		InterruptPending = true;
	}
	check_client_connection();
	return stop_requested();
}

/*
 * interrupt_pending() -> bool
 *
 * llmfdw_interrupt_pending() for FDW code: code that waits on the network
 * calls this every few milliseconds and, when it is true, cancels its work
 * and raises.
 */
/* The backend's own thread: the one that started Python. */
static pthread_t backend_thread;

/*
 * Whether the caller runs on the backend's thread, with a Python exception
 * set when not.  Postgres is not thread-safe, and Python threads exist in a
 * backend (gRPC's, the one that frees a cancelled query's objects, whose
 * finalizers may run FDW code): every host function checks this first, so
 * none of them ever enters Postgres from another thread.
 */
static bool
on_backend_thread(void)
{
	if (pthread_equal(pthread_self(), backend_thread))
		return true;
	PyErr_SetString(PyExc_RuntimeError,
					"llmfdw: Postgres may only be called from the backend's own thread");
	return false;
}

static PyObject *
host_interrupt_pending(PyObject *self, PyObject *args)
{
	if (!on_backend_thread())
		return NULL;
	return PyBool_FromLong(llmfdw_interrupt_pending());
}

/*
 * wait_readable(fd, timeout_ms) -> bool
 *
 * Sleep in Postgres's own wait (WaitLatchOrSocket) until fd is readable, the
 * latch is set, or timeout_ms pass, with the GIL released and signals let
 * through; True when fd is readable.  The client's gRPC threads make an
 * eventfd readable when a message arrives, and every interrupt that can end
 * the query (cancel, statement_timeout, termination, the client-connection
 * check's timer) sets the latch, so a backend waiting on the sidecar wakes at
 * once for either and spends nothing polling: it had woken every 5 ms to
 * ask interrupt_pending(), 200 times a second per waiting backend.  The
 * caller asks interrupt_pending() after every wake-up.  The wait is reported
 * as whatever wait event the caller's fetch set (LlmfdwSidecar).
 */
static PyObject *
host_wait_readable(PyObject *self, PyObject *args)
{
	int			fd;
	long		timeout_ms;
	int			rc = 0;
	bool		failed = false;
	uint32		outer = *my_wait_event_info;
	uint32		event = outer ? outer : PG_WAIT_EXTENSION;
	sigset_t	all;
	sigset_t	saved;
	MemoryContext cxt = CurrentMemoryContext;

	if (!on_backend_thread())
		return NULL;
	if (!PyArg_ParseTuple(args, "il", &fd, &timeout_ms))
		return NULL;
	if (fd < 0 || timeout_ms < 0)
	{
		PyErr_SetString(PyExc_ValueError, "wait_readable: fd and timeout_ms must not be negative");
		return NULL;
	}
	sigfillset(&all);
	Py_BEGIN_ALLOW_THREADS
	pthread_sigmask(SIG_UNBLOCK, &all, &saved);
	PG_TRY();
	{
		rc = WaitLatchOrSocket(MyLatch,
							   WL_LATCH_SET | WL_SOCKET_READABLE | WL_TIMEOUT | WL_POSTMASTER_DEATH,
							   fd, timeout_ms, event);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		failed = true;
	}
	PG_END_TRY();
	pthread_sigmask(SIG_SETMASK, &saved, NULL);
	Py_END_ALLOW_THREADS
	/* WaitLatchOrSocket ended its wait event: the caller's fetch is still waiting */
	if (outer)
		pgstat_report_wait_start(outer);
	if (failed)
	{
		PyErr_SetString(PyExc_OSError, "llmfdw: waiting for the sidecar failed");
		return NULL;
	}
	if (rc & WL_LATCH_SET)
		ResetLatch(MyLatch);
	if (rc & WL_POSTMASTER_DEATH)
	{
		/* as llmfdw_interrupt_pending() does: the host's error path ends the session */
		ProcDiePending = true;
		InterruptPending = true;
	}
	return PyBool_FromLong((rc & WL_SOCKET_READABLE) != 0);
}

/* Set multicorn.utils.QueryCanceled as the pending Python exception. */
void
llmfdw_set_query_canceled(void)
{
	PyObject   *exc = llmfdw_import_attr("multicorn.utils", "QueryCanceled");

	if (exc == NULL)
		return;					/* the import error is the pending exception */
	PyErr_SetString(exc, "query canceled");
	Py_DECREF(exc);
}

/*
 * statement_time_left() -> float | None
 *
 * Seconds until statement_timeout fires, or None when no timeout is armed.
 * FDW code uses it as its gRPC deadline, so the sidecar stops the work when
 * Postgres would give up anyway.
 */
static PyObject *
host_statement_time_left(PyObject *self, PyObject *args)
{
	TimestampTz finish;
	long		secs;
	int			usecs;

	if (!on_backend_thread())
		return NULL;
	if (!get_timeout_active(STATEMENT_TIMEOUT))
		Py_RETURN_NONE;
	finish = get_timeout_finish_time(STATEMENT_TIMEOUT);
	TimestampDifference(GetCurrentTimestamp(), finish, &secs, &usecs);
	return PyFloat_FromDouble(secs + usecs / 1000000.0);
}

/*
 * log(level, message, hint, detail): report a non-error message.
 * level is one of the elog levels DEBUG1, LOG, INFO, NOTICE, WARNING; errors
 * are raised as Python exceptions instead, so they unwind Python first.
 */
static PyObject *
host_log(PyObject *self, PyObject *args)
{
	int			level;
	PyObject   *pymessage;
	PyObject   *pyhint = Py_None;
	PyObject   *pydetail = Py_None;
	char	   *message;
	char	   *hint;
	char	   *detail;
	MemoryContext oldcontext = CurrentMemoryContext;
	volatile bool failed = false;

	if (!on_backend_thread() ||
		!PyArg_ParseTuple(args, "iO|OO", &level, &pymessage, &pyhint, &pydetail))
		return NULL;
	if (level >= ERROR)
		level = WARNING;
	message = py_message(pymessage);
	hint = py_message(pyhint);
	detail = py_message(pydetail);

	/*
	 * Python called us: an ERROR must not longjmp through its frames, so one
	 * (a failure to send the message, say) becomes a Python exception.
	 */
	PG_TRY();
	{
		ereport(level,
				(errmsg_internal("%s", message ? message : ""),
				 hint ? errhint("%s", hint) : 0,
				 detail ? errdetail_internal("%s", detail) : 0));
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcontext);
		set_python_error_from_pg();
		failed = true;
	}
	PG_END_TRY();

	if (failed)
		return NULL;
	Py_RETURN_NONE;
}

/* dict[key] = text converted from the server encoding; false with an error set. */
static bool
set_text_item(PyObject *dict, const char *key, const char *text)
{
	PyObject   *value = llmfdw_text_to_python(text, -1);
	bool		ok;

	if (value == NULL)
		return false;
	ok = PyDict_SetItemString(dict, key, value) == 0;
	Py_DECREF(value);
	return ok;
}

/*
 * session() -> dict: the database and role of this backend, so requests can
 * be metered per tenant without the FDW class repeating it in options.
 */
static PyObject *
host_session(PyObject *self, PyObject *args)
{
	char	   *volatile database = NULL;
	char	   *volatile role = NULL;
	MemoryContext oldcontext = CurrentMemoryContext;
	PyObject   *result;
	PyObject   *pid;

	if (!on_backend_thread())
		return NULL;

	/* A catalog lookup failure leaves the name empty rather than failing. */
	PG_TRY();
	{
		database = get_database_name(MyDatabaseId);
		role = GetUserNameFromId(GetUserId(), true);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcontext);
		FlushErrorState();
	}
	PG_END_TRY();

	result = PyDict_New();
	if (result == NULL)
		return NULL;
	pid = PyLong_FromLong(MyProcPid);
	if (pid == NULL ||
		PyDict_SetItemString(result, "pid", pid) < 0 ||
		!set_text_item(result, "database", database ? database : "") ||
		!set_text_item(result, "role", role ? role : ""))
		Py_CLEAR(result);
	Py_XDECREF(pid);
	return result;
}

static PyMethodDef host_methods[] = {
	{"interrupt_pending", host_interrupt_pending, METH_NOARGS,
	"True when Postgres wants the current query to stop."},
	{"wait_readable", host_wait_readable, METH_VARARGS,
	"wait_readable(fd, timeout_ms): sleep until fd is readable, a signal, or the timeout."},
	{"statement_time_left", host_statement_time_left, METH_NOARGS,
	"Seconds left under statement_timeout, or None."},
	{"log", host_log, METH_VARARGS,
	"log(level, message, hint=None, detail=None)"},
	{"session", host_session, METH_NOARGS,
	"The database, role and backend pid of this session."},
	{NULL, NULL, 0, NULL}
};

static struct PyModuleDef host_module = {
	PyModuleDef_HEAD_INIT, "_llmfdw_host",
	"Postgres services for FDW code running inside the llmfdw host.",
	-1, host_methods
};

static PyObject *
init_host_module(void)
{
	PyObject   *m = PyModule_Create(&host_module);

	if (m == NULL)
		return NULL;
	if (PyModule_AddIntConstant(m, "DEBUG", DEBUG1) < 0 ||
		PyModule_AddIntConstant(m, "LOG", LOG) < 0 ||
		PyModule_AddIntConstant(m, "INFO", INFO) < 0 ||
		PyModule_AddIntConstant(m, "NOTICE", NOTICE) < 0 ||
		PyModule_AddIntConstant(m, "WARNING", WARNING) < 0)
	{
		Py_DECREF(m);
		return NULL;
	}
	return m;
}

/* ---------------------------------------------------------------------
 * Interpreter start-up
 * --------------------------------------------------------------------- */

/*
 * Put the llmfdw.python_path directories (the venv's site-packages) in front
 * of sys.path; site.addsitedir also processes their .pth files.
 */
static const char *path_setup_code =
"import sys, site\n"
"def _llmfdw_setup(paths):\n"
"    before = list(sys.path)\n"
"    for p in paths:\n"
"        site.addsitedir(p)\n"
"    added = [p for p in sys.path if p not in before]\n"
"    sys.path[:] = added + before\n"
"    if not hasattr(sys, 'argv'):\n"
"        sys.argv = ['postgres']\n";

/*
 * Run path_setup_code and call it with the directories.  Returns false with
 * a Python exception set.  Paths are file names, so they are decoded with
 * the file-system encoding, as Python decodes every other path.
 */
static bool
setup_sys_path(List *dirs)
{
	PyObject   *globals = PyDict_New();
	PyObject   *code_result = NULL;
	PyObject   *paths = NULL;
	PyObject   *setup;
	PyObject   *result = NULL;
	ListCell   *lc;

	if (globals == NULL ||
		PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins()) < 0)
		goto done;
	code_result = PyRun_String(path_setup_code, Py_file_input, globals, globals);
	if (code_result == NULL)
		goto done;
	paths = PyList_New(0);
	if (paths == NULL)
		goto done;
	foreach(lc, dirs)
	{
		const char *dir = lfirst(lc);
		PyObject   *p = PyUnicode_DecodeFSDefault(dir);
		int			rc = p ? PyList_Append(paths, p) : -1;

		Py_XDECREF(p);
		if (rc < 0)
			goto done;
	}
	setup = PyDict_GetItemString(globals, "_llmfdw_setup");	/* borrowed */
	if (setup == NULL)
	{
		PyErr_SetString(PyExc_RuntimeError, "_llmfdw_setup is missing");
		goto done;
	}
	result = PyObject_CallOneArg(setup, paths);
done:
	Py_XDECREF(globals);
	Py_XDECREF(code_result);
	Py_XDECREF(paths);
	Py_XDECREF(result);
	return result != NULL;
}

/*
 * Start the interpreter on this thread and set sys.path, leaving the GIL held.
 * Returns false, after reporting at `elevel`, when Python cannot start at all;
 * *path_ok says whether sys.path could be set (the server log has why not).
 */
static bool
start_interpreter(int elevel, bool *path_ok)
{
	PyConfig	config;
	PyStatus	status;
	char	   *rawpath;
	List	   *dirs = NIL;

	if (PyImport_AppendInittab("_llmfdw_host", init_host_module) == -1)
	{
		ereport(elevel, (errmsg("llmfdw: could not register the _llmfdw_host module")));
		return false;
	}
	backend_thread = pthread_self();

	PyConfig_InitIsolatedConfig(&config);
	config.install_signal_handlers = 0;
	config.site_import = 0;
	config.use_environment = 1;
	status = PyConfig_SetBytesString(&config, &config.program_name,
									 LLMFDW_PYTHON_EXECUTABLE);
	if (!PyStatus_Exception(status))
		status = Py_InitializeFromConfig(&config);
	PyConfig_Clear(&config);
	if (PyStatus_Exception(status))
	{
		ereport(elevel,
				(errcode(ERRCODE_FDW_ERROR),
				 errmsg("llmfdw: could not start the embedded Python interpreter: %s",
						status.err_msg ? status.err_msg : "unknown error")));
		return false;
	}

	/* From here on Python is up; set sys.path before any import. */
	rawpath = pstrdup(llmfdw_python_path ? llmfdw_python_path : "");
	if (!SplitDirectoriesString(rawpath, ':', &dirs))
		dirs = NIL;
	*path_ok = setup_sys_path(dirs);
	if (!*path_ok)
		PyErr_Print();			/* to the server log */
	return true;
}

/* Threads of this process (/proc/self/task), or -1 if it cannot be read. */
static int
process_threads(void)
{
	DIR		   *dir = opendir("/proc/self/task");
	struct dirent *de;
	int			n = 0;

	if (dir == NULL)
		return -1;
	while ((de = readdir(dir)) != NULL)
		if (de->d_name[0] != '.')
			n++;
	closedir(dir);
	return n;
}

/*
 * Preloading: with llmfdw in shared_preload_libraries and
 * llmfdw.preload_python on, the postmaster starts the interpreter and imports
 * the modules a first query needs (the FDW classes, their gRPC client, the
 * proto messages: about 100 ms), so that every backend inherits them through
 * fork instead of paying for them at its first llm.* query.
 *
 * Why this is safe, and the conditions it keeps:
 *	- Importing them starts no thread (checked below: the postmaster refuses to
 *	  start otherwise) and opens no channel: gRPC's core starts its threads and
 *	  its fork handlers only when the first channel is made (grpc_init), which
 *	  happens in each backend.  With GRPC_ENABLE_FORK_SUPPORT unset (the
 *	  default) nothing of gRPC's runs at fork.
 *	- The postmaster keeps the GIL (no other thread could want it), so a child
 *	  starts as one forked by os.fork() does; at its first use it calls
 *	  PyOS_AfterFork_Child, which resets the interpreter's locks and thread
 *	  states for the new process and runs os.register_at_fork's child hooks
 *	  (the random module reseeds; llm_tables makes its per-session id there).
 *	- The postmaster never runs Python after this.
 *
 * What a backend shares with its siblings: the interpreter's pages until it
 * writes to them (reference counts make most of what it uses its own, as
 * without preloading), and str hashing's random key (chosen once per server
 * start instead of once per backend).  llmfdw.python_path is read once, at
 * server start.
 */
static bool python_preloaded = false;
static pid_t preload_pid = 0;
static bool preload_path_ok = false;

static const char *const preload_modules[] = {"multicorn", "llm_tables.tables"};

void
llmfdw_python_preload(void)
{
	int			threads;

	if (!start_interpreter(WARNING, &preload_path_ok))
		return;					/* backends try again, and say why, at their first query */
	python_preloaded = true;
	preload_pid = getpid();
	for (int i = 0; preload_path_ok && i < lengthof(preload_modules); i++)
	{
		PyObject   *mod = PyImport_ImportModule(preload_modules[i]);

		if (mod == NULL)
		{
			PyErr_Print();		/* to the server log */
			ereport(WARNING,
					(errmsg("llmfdw: could not preload Python module \"%s\"", preload_modules[i]),
					 errdetail("Backends import it at their first llm.* query, where the error shows again.")));
			break;
		}
		Py_DECREF(mod);
	}
	threads = process_threads();	/* -1 without /proc: nothing to check */
	if (threads > 1)
		ereport(FATAL,
				(errmsg("llmfdw: preloading Python left %d threads in the postmaster", threads),
				 errdetail("A process that forks must have one thread."),
				 errhint("Set llmfdw.preload_python = off, or remove llmfdw from shared_preload_libraries.")));
}

void
llmfdw_python_init(void)
{
	bool		path_ok;

	if (python_ready)
		return;

	if (python_preloaded)
	{
		/* Started by llmfdw_python_preload; this thread holds the GIL. */
		backend_thread = pthread_self();
		if (getpid() != preload_pid)
			PyOS_AfterFork_Child();
		path_ok = preload_path_ok;
	}
	else if (!start_interpreter(ERROR, &path_ok))
		return;					/* not reached: ERROR */

	/*
	 * Hand the GIL back: from now on every entry takes it explicitly.  The
	 * interpreter is up even if sys.path could not be set: it cannot be
	 * started twice, and imports will then fail with a clear message.
	 */
	PyEval_SaveThread();
	python_ready = true;
	if (!path_ok)
		ereport(ERROR,
				(errcode(ERRCODE_FDW_ERROR),
				 errmsg("llmfdw: could not set up sys.path from llmfdw.python_path"),
				 errhint("Check llmfdw.python_path in postgresql.conf; the server log has the Python error.")));
}

/* ---------------------------------------------------------------------
 * Imports
 * --------------------------------------------------------------------- */

/* getattr(import(module), attr); returns a new reference or NULL (error set). */
PyObject *
llmfdw_import_attr(const char *module, const char *attr)
{
	PyObject   *mod = PyImport_ImportModule(module);
	PyObject   *obj;

	if (mod == NULL)
		return NULL;
	obj = PyObject_GetAttrString(mod, attr);
	Py_DECREF(mod);
	return obj;
}

/*
 * An attribute of the multicorn package (Qual, ColumnDefinition, ...),
 * looked up once per backend instead of once per qual.
 */
PyObject *
llmfdw_multicorn_attr(const char *attr)
{
	static PyObject *multicorn = NULL;

	if (multicorn == NULL)
	{
		multicorn = PyImport_ImportModule("multicorn");
		if (multicorn == NULL)
			return NULL;
	}
	return PyObject_GetAttrString(multicorn, attr);
}

/* ---------------------------------------------------------------------
 * Errors
 * --------------------------------------------------------------------- */

/* obj.name as log or error text (see py_message), or NULL. */
static char *
py_attr_message(PyObject *obj, const char *name)
{
	PyObject   *attr;
	char	   *result;

	attr = PyObject_GetAttrString(obj, name);
	if (attr == NULL)
	{
		PyErr_Clear();
		return NULL;
	}
	result = py_message(attr);
	Py_DECREF(attr);
	return result;
}

/* The formatted traceback, for the server log; NULL if there is none. */
static char *
py_traceback(PyObject *type, PyObject *value, PyObject *tb)
{
	PyObject   *fmt;
	PyObject   *lines;
	PyObject   *empty;
	PyObject   *joined = NULL;
	char	   *result = NULL;

	if (tb == NULL)
		return NULL;
	fmt = llmfdw_import_attr("traceback", "format_exception");
	lines = fmt ? PyObject_CallFunctionObjArgs(fmt, type, value, tb, NULL) : NULL;
	empty = lines ? PyUnicode_FromString("") : NULL;
	if (empty != NULL)
		joined = PyUnicode_Join(empty, lines);
	if (joined != NULL)
		result = py_message(joined);
	Py_XDECREF(fmt);
	Py_XDECREF(lines);
	Py_XDECREF(empty);
	Py_XDECREF(joined);
	PyErr_Clear();
	return result;
}

/* ---------------------------------------------------------------------
 * Freeing a cancelled query's Python objects off the main thread
 *
 * A cancelled `input = ANY(<200,000 texts>)` leaves hundreds of thousands of
 * Python objects behind (in its traceback's frames, or a half-built list);
 * freeing them takes milliseconds of CPU, tens beside a busy sidecar, and a
 * user's Ctrl-C would wait for that: the client has its answer only once the
 * abort is over.  So they are kept aside until the transaction (or
 * subtransaction) has ended, when the abort no longer needs the GIL (it
 * closes the scan's generator), and then freed by a short-lived thread in
 * steps, letting the GIL go between steps, while the backend answers the
 * client.  The thread starts with every signal blocked, so it never runs
 * Postgres's handlers; the backend never finalizes Python, so a thread still
 * running at exit does no harm.
 * --------------------------------------------------------------------- */

/* List items freed between two GIL releases (a few hundred microseconds). */
#define LLMFDW_FREE_STEP 4096

/* Garbage set aside, freed when the (sub)transaction ends: a list, or NULL. */
static PyObject *garbage_pile = NULL;

/* Let a thread waiting for the GIL (the main one) take it. */
static void
yield_gil(void)
{
	Py_BEGIN_ALLOW_THREADS
	Py_END_ALLOW_THREADS
}

/* Free one object: a list we alone hold from its end, a traceback frame by frame. */
static void
free_one_in_steps(PyObject *obj)
{
	if (PyList_CheckExact(obj) && Py_REFCNT(obj) == 1)
	{
		for (Py_ssize_t n = PyList_GET_SIZE(obj); n > 0; n -= Min(n, LLMFDW_FREE_STEP))
		{
			if (PyList_SetSlice(obj, n - Min(n, LLMFDW_FREE_STEP), n, NULL) < 0)
				PyErr_Clear();
			yield_gil();
		}
	}
	else if (PyTraceBack_Check(obj))
	{
		for (PyTracebackObject *tb = (PyTracebackObject *) obj; tb != NULL; tb = tb->tb_next)
		{
			PyObject   *r = PyObject_CallMethod((PyObject *) tb->tb_frame, "clear", NULL);

			Py_XDECREF(r);
			PyErr_Clear();
			yield_gil();
		}
	}
}

/* The thread: free every object of the pile (a list it owns), then the pile. */
static void
free_pile(void *arg)
{
	PyObject   *pile = arg;
	PyGILState_STATE gil = PyGILState_Ensure();

	while (PyList_GET_SIZE(pile) > 0)
	{
		Py_ssize_t	last = PyList_GET_SIZE(pile) - 1;
		PyObject   *obj = Py_NewRef(PyList_GET_ITEM(pile, last));

		if (PyList_SetSlice(pile, last, last + 1, NULL) < 0)
		{
			PyErr_Clear();
			Py_DECREF(obj);
			break;
		}
		free_one_in_steps(obj);
		Py_DECREF(obj);
		yield_gil();
	}
	Py_DECREF(pile);
	PyGILState_Release(gil);
}

/* At the end of a (sub)transaction: hand the pile to a new thread.  Without the GIL. */
static void
free_garbage_pile(void)
{
	PyObject   *pile = garbage_pile;
	sigset_t	all;
	sigset_t	saved;
	unsigned long id;

	if (pile == NULL)
		return;
	garbage_pile = NULL;
	if (proc_exit_inprogress)
		return;					/* the process ends: nothing to free */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &saved);	/* the thread inherits this */
	id = PyThread_start_new_thread(free_pile, pile);
	pthread_sigmask(SIG_SETMASK, &saved, NULL);
	if (id == PYTHREAD_INVALID_THREAD_ID)
	{
		LlmfdwPyState st;

		llmfdw_enter(&st);
		Py_DECREF(pile);
		llmfdw_leave(&st);
	}
}

static void
garbage_xact_callback(XactEvent event, void *arg)
{
	free_garbage_pile();
}

static void
garbage_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						 SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB || event == SUBXACT_EVENT_COMMIT_SUB)
		free_garbage_pile();
}

/*
 * Set garbage (steals the reference) aside, to be freed in another thread
 * once the transaction has ended (see above); at once if that cannot be
 * arranged.  GIL held; never raises a Postgres ERROR.
 */
void
llmfdw_free_later(PyObject *garbage)
{
	static bool registered = false;
	MemoryContext cxt = CurrentMemoryContext;

	if (garbage == NULL)
		return;
	if (!registered)
	{
		PG_TRY();
		{
			RegisterXactCallback(garbage_xact_callback, NULL);
			RegisterSubXactCallback(garbage_subxact_callback, NULL);
			registered = true;
		}
		PG_CATCH();
		{
			MemoryContextSwitchTo(cxt);
			FlushErrorState();
		}
		PG_END_TRY();
	}
	if (registered && garbage_pile == NULL)
		garbage_pile = PyList_New(0);
	if (!registered || garbage_pile == NULL || PyList_Append(garbage_pile, garbage) < 0)
		PyErr_Clear();
	Py_DECREF(garbage);
}

/*
 * Turn the pending Python exception into a SQL ERROR.  Must be called with
 * the GIL held (inside LLMFDW_WITH_PYTHON); releases it before reporting,
 * so nothing longjmps while Python holds the GIL.
 *
 * If Postgres has an interrupt pending (the FDW code saw a cancel and
 * raised), the interrupt wins: the user gets Postgres's own "canceling
 * statement due to user request" or statement_timeout message.
 *
 * Exceptions raised through multicorn.utils.log_to_postgres(ERROR) (any
 * MulticornException) carry a message, hint, detail and SQLSTATE meant for
 * the user and are shown as they are.  Other exception objects may also
 * carry a `sqlstate` (five characters) and a `hint`.  Anything else is an
 * unexpected failure: the client sees its type and message; the traceback
 * goes to the server log only, since its file paths tell a database user
 * about the server's file system and nothing they can act on.
 */
void
llmfdw_raise_python_error(LlmfdwPyState *st, const char *context)
{
	PyObject   *type;
	PyObject   *value;
	PyObject   *tb;
	PyObject   *mc_exc;
	char	   *message = NULL;
	char	   *hint = NULL;
	char	   *detail = NULL;
	char	   *traceback = NULL;
	char	   *sqlstate = NULL;
	bool		expected = false;
	int			code = ERRCODE_FDW_ERROR;
	bool		stopping = stop_requested();

	PyErr_Fetch(&type, &value, &tb);
	if (type != NULL)
		PyErr_NormalizeException(&type, &value, &tb);

	if (value != NULL)
	{
		mc_exc = llmfdw_import_attr("multicorn.utils", "MulticornException");
		if (mc_exc == NULL)
			PyErr_Clear();
		else
		{
			expected = PyObject_IsInstance(value, mc_exc) == 1;
			PyErr_Clear();
			Py_DECREF(mc_exc);
		}
		if (expected)
		{
			message = py_attr_message(value, "message");
			detail = py_attr_message(value, "detail");
		}
		else
		{
			char	   *text = py_message(value);
			char	   *tname = py_attr_message(type, "__name__");

			if (tname == NULL)
				tname = pstrdup("Exception");
			message = text && *text ? psprintf("%s: %s", tname, text) : tname;
			/* a cancel's traceback is never shown: Postgres's own error wins */
			traceback = stopping ? NULL : py_traceback(type, value, tb);
		}
		hint = py_attr_message(value, "hint");
		sqlstate = py_attr_message(value, "sqlstate");
	}
	Py_XDECREF(type);
	if (stopping)
	{
		llmfdw_free_later(tb);
		llmfdw_free_later(value);
	}
	else
	{
		Py_XDECREF(value);
		Py_XDECREF(tb);
	}

	/* Leave Python before anything can longjmp. */
	llmfdw_leave(st);

	CHECK_FOR_INTERRUPTS();

	if (sqlstate && strlen(sqlstate) == 5)
		code = MAKE_SQLSTATE(sqlstate[0], sqlstate[1], sqlstate[2],
							 sqlstate[3], sqlstate[4]);

	/* The caller's PG_CATCH sees st->held == false and leaves it alone. */
	ereport(ERROR,
			(errcode(code),
			 errmsg("%s", message ? message : "unknown Python error"),
			 detail ? errdetail_internal("%s", detail) : 0,
			 traceback ? errdetail("The Python traceback is in the server log.") : 0,
			 traceback ? errdetail_log("%s", traceback) : 0,
			 hint ? errhint("%s", hint) : 0,
			 context ? errcontext("%s", context) : 0));
}
