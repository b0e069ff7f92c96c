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
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include <signal.h>

#include "commands/dbcommands.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/varlena.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"

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
 * The _llmfdw_host module
 * --------------------------------------------------------------------- */

/*
 * interrupt_pending() -> bool
 *
 * Lets blocked signals through for a moment (their handlers only set flags),
 * then reports whether Postgres wants this query to stop.  FDW code that
 * waits on the network calls this every few tens of milliseconds and, when
 * it is true, cancels its work and raises; the host then turns the pending
 * interrupt into Postgres's own error ("canceling statement due to ...").
 */
static PyObject *
host_interrupt_pending(PyObject *self, PyObject *args)
{
	sigset_t	blocked;
	sigset_t	saved;

	sigfillset(&blocked);
	pthread_sigmask(SIG_UNBLOCK, &blocked, &saved);
	pthread_sigmask(SIG_SETMASK, &saved, NULL);

	if (InterruptPending && (QueryCancelPending || ProcDiePending))
		Py_RETURN_TRUE;
	Py_RETURN_FALSE;
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
	const char *message;
	const char *hint = NULL;
	const char *detail = NULL;
	volatile bool failed = false;

	if (!PyArg_ParseTuple(args, "is|zz", &level, &message, &hint, &detail))
		return NULL;
	if (level >= ERROR)
		level = WARNING;

	PG_TRY();
	{
		ereport(level,
				(errmsg_internal("%s", message),
				 hint ? errhint("%s", hint) : 0,
				 detail ? errdetail_internal("%s", detail) : 0));
	}
	PG_CATCH();
	{
		FlushErrorState();
		failed = true;
	}
	PG_END_TRY();

	if (failed)
	{
		PyErr_SetString(PyExc_RuntimeError, "could not report a message to Postgres");
		return NULL;
	}
	Py_RETURN_NONE;
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

	PG_TRY();
	{
		database = get_database_name(MyDatabaseId);
		role = GetUserNameFromId(GetUserId(), true);
	}
	PG_CATCH();
	{
		FlushErrorState();
	}
	PG_END_TRY();

	return Py_BuildValue("{s:s,s:s,s:i}",
						 "database", database ? database : "",
						 "role", role ? role : "",
						 "pid", MyProcPid);
}

static PyMethodDef host_methods[] = {
	{"interrupt_pending", host_interrupt_pending, METH_NOARGS,
	"True when Postgres wants the current query to stop."},
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
	PyModule_AddIntConstant(m, "DEBUG", DEBUG1);
	PyModule_AddIntConstant(m, "LOG", LOG);
	PyModule_AddIntConstant(m, "INFO", INFO);
	PyModule_AddIntConstant(m, "NOTICE", NOTICE);
	PyModule_AddIntConstant(m, "WARNING", WARNING);
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

void
llmfdw_python_init(void)
{
	PyConfig	config;
	PyStatus	status;
	PyObject   *globals;
	PyObject   *setup;
	PyObject   *paths;
	PyObject   *result;
	char	   *rawpath;
	List	   *dirs = NIL;
	ListCell   *lc;
	bool		path_ok;

	if (python_ready)
		return;

	if (PyImport_AppendInittab("_llmfdw_host", init_host_module) == -1)
		elog(ERROR, "llmfdw: could not register the _llmfdw_host module");

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
		ereport(ERROR,
				(errcode(ERRCODE_FDW_ERROR),
				 errmsg("llmfdw: could not start the embedded Python interpreter: %s",
						status.err_msg ? status.err_msg : "unknown error")));

	/* From here on Python is up; set sys.path before any import. */
	globals = PyDict_New();
	PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins());
	result = PyRun_String(path_setup_code, Py_file_input, globals, globals);
	Py_XDECREF(result);

	rawpath = pstrdup(llmfdw_python_path ? llmfdw_python_path : "");
	if (!SplitDirectoriesString(rawpath, ':', &dirs))
		dirs = NIL;
	paths = PyList_New(0);
	foreach(lc, dirs)
	{
		PyObject   *p = PyUnicode_FromString((char *) lfirst(lc));

		PyList_Append(paths, p);
		Py_DECREF(p);
	}
	setup = PyDict_GetItemString(globals, "_llmfdw_setup");
	result = setup ? PyObject_CallOneArg(setup, paths) : NULL;
	Py_DECREF(paths);
	Py_DECREF(globals);
	path_ok = (result != NULL);
	if (!path_ok)
		PyErr_Print();			/* to the server log */
	Py_XDECREF(result);

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

/* str(obj) as a palloc'd UTF-8 string, or NULL. */
static char *
py_str(PyObject *obj)
{
	PyObject   *s;
	const char *utf8;
	char	   *result = NULL;

	if (obj == NULL || obj == Py_None)
		return NULL;
	s = PyObject_Str(obj);
	if (s == NULL)
	{
		PyErr_Clear();
		return NULL;
	}
	utf8 = PyUnicode_AsUTF8(s);
	if (utf8 != NULL)
		result = pstrdup(utf8);
	else
		PyErr_Clear();
	Py_DECREF(s);
	return result;
}

static char *
py_attr_str(PyObject *obj, const char *name)
{
	PyObject   *attr;
	char	   *result;

	if (!PyObject_HasAttrString(obj, name))
		return NULL;
	attr = PyObject_GetAttrString(obj, name);
	if (attr == NULL)
	{
		PyErr_Clear();
		return NULL;
	}
	result = py_str(attr);
	Py_DECREF(attr);
	return result;
}

/* The last few frames of a traceback, for errdetail. */
static char *
py_traceback(PyObject *type, PyObject *value, PyObject *tb)
{
	PyObject   *fmt;
	PyObject   *lines;
	PyObject   *joined = NULL;
	char	   *result = NULL;

	if (tb == NULL)
		return NULL;
	fmt = llmfdw_import_attr("traceback", "format_exception");
	if (fmt == NULL)
	{
		PyErr_Clear();
		return NULL;
	}
	lines = PyObject_CallFunctionObjArgs(fmt, type, value, tb, NULL);
	Py_DECREF(fmt);
	if (lines != NULL)
	{
		PyObject   *empty = PyUnicode_FromString("");

		joined = PyUnicode_Join(empty, lines);
		Py_DECREF(empty);
		Py_DECREF(lines);
	}
	if (joined != NULL)
	{
		result = py_str(joined);
		Py_DECREF(joined);
	}
	PyErr_Clear();
	return result;
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
 * Exceptions raised through multicorn.utils.log_to_postgres(ERROR) carry a
 * message, hint and detail meant for the user and are shown as they are.
 * Exception objects may also carry a `sqlstate` (five characters) and a
 * `hint`.  Anything else is an unexpected failure: its type and message,
 * with the traceback in DETAIL.
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
	char	   *sqlstate = NULL;
	bool		expected = false;
	int			code = ERRCODE_FDW_ERROR;

	PyErr_Fetch(&type, &value, &tb);
	PyErr_NormalizeException(&type, &value, &tb);

	if (value != NULL)
	{
		mc_exc = llmfdw_import_attr("multicorn.utils", "MulticornException");
		if (mc_exc == NULL)
			PyErr_Clear();
		else
		{
			expected = PyObject_IsInstance(value, mc_exc) == 1;
			Py_DECREF(mc_exc);
		}
		if (expected)
		{
			message = py_attr_str(value, "message");
			detail = py_attr_str(value, "detail");
		}
		else
		{
			char	   *text = py_str(value);
			const char *tname = ((PyTypeObject *) type)->tp_name;

			message = text && *text ? psprintf("%s: %s", tname, text) : pstrdup(tname);
			detail = py_traceback(type, value, tb);
		}
		hint = py_attr_str(value, "hint");
		sqlstate = py_attr_str(value, "sqlstate");
	}
	Py_XDECREF(type);
	Py_XDECREF(value);
	Py_XDECREF(tb);

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
			 hint ? errhint("%s", hint) : 0,
			 context ? errcontext("%s", context) : 0));
}
