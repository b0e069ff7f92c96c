/*-------------------------------------------------------------------------
 *
 * llmfdw.h
 *		  Shared declarations of the llmfdw FDW host: a foreign-data wrapper
 *		  that runs FDW classes written against Multicorn2's Python API in
 *		  an embedded CPython interpreter.
 *
 * Files, by concern (as in contrib/postgres_fdw):
 *	llmfdw.c	handler, validator, GUCs, planner and executor callbacks
 *	python.c	the interpreter: start-up, GIL, signals, errors, host module
 *	instance.c	per-table FDW instances: options, columns, cache
 *	quals.c		restriction clauses -> Multicorn Qual objects
 *	convert.c	Datum <-> Python values
 *	batchjoin.c	batched nested loop: joins with one request per batch of rows
 *
 *-------------------------------------------------------------------------
 */
#ifndef LLMFDW_H
#define LLMFDW_H

#include "postgres.h"
#include "compat.h"			/* shims for older PostgreSQL versions */

/* Python's headers redefine these; let them win, as PL/Python does. */
#undef _POSIX_C_SOURCE
#undef _XOPEN_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "access/tupdesc.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "nodes/execnodes.h"
#include "nodes/parsenodes.h"
#include "nodes/pathnodes.h"

/* GUC: directories prepended to the embedded interpreter's sys.path. */
extern char *llmfdw_python_path;

/* ---- llmfdw.c ---- */

/* The next row of an execute() iterator, reported as waiting on the sidecar. */
extern PyObject *llmfdw_iter_next(PyObject *iterator);

/* ---- python.c ---- */

/*
 * Every entry into Python goes through llmfdw_enter()/llmfdw_leave(): they
 * take the GIL and block signals for the duration of the Python call, so that
 * threads Python starts (gRPC's) never run Postgres's signal handlers.
 * Signals are let through only at interrupt-poll points (see
 * _llmfdw_host.interrupt_pending()).  PyGILState handles are opaque ints.
 */
typedef struct LlmfdwPyState
{
	PyGILState_STATE gil;
	sigset_t	saved_mask;
	bool		held;			/* GIL currently held through this state */
} LlmfdwPyState;

extern void llmfdw_python_init(void);
extern void llmfdw_enter(LlmfdwPyState *st);
extern void llmfdw_leave(LlmfdwPyState *st);
pg_noreturn extern void llmfdw_raise_python_error(LlmfdwPyState *st, const char *context);
extern PyObject *llmfdw_import_attr(const char *module, const char *attr);
extern PyObject *llmfdw_multicorn_attr(const char *attr);

/*
 * Every string between Postgres and Python goes through these: the server
 * encoding on the Postgres side, str (UTF-8 in the C API) on the Python side.
 * The first three are safe with the GIL held and report failure as a Python
 * exception; llmfdw_utf8_to_server raises a Postgres ERROR (call it without
 * the GIL).  SQL_ASCII databases are taken as UTF-8 with surrogateescape.
 */
extern PyObject *llmfdw_text_to_python(const char *s, int len);
extern char *llmfdw_python_to_server(PyObject *obj);
extern bool llmfdw_python_to_utf8(PyObject *obj, StringInfo buf);
extern char *llmfdw_utf8_to_server(const char *s, int len);

/*
 * Run "body" with the GIL held; release it (and restore signals) however
 * body exits, including a Postgres ERROR thrown from inside it.
 */
#define LLMFDW_WITH_PYTHON(st) \
	do { \
		llmfdw_enter(&(st)); \
		PG_TRY(); \
		{
#define LLMFDW_END_PYTHON(st) \
		} \
		PG_CATCH(); \
		{ \
			llmfdw_leave(&(st)); \
			PG_RE_THROW(); \
		} \
		PG_END_TRY(); \
		llmfdw_leave(&(st)); \
	} while (0)

/* ---- instance.c ---- */

/* Per-column facts needed to convert values both ways. */
typedef struct LlmfdwColumn
{
	char	   *name;
	Oid			typid;
	int32		typmod;
	bool		dropped;
	bool		is_array;		/* type is an array type */
	bool		is_json;		/* json or jsonb */
	bool		is_bytea;
	FmgrInfo	infunc;			/* type input function */
	Oid			ioparam;
	FmgrInfo	recvfunc;		/* binary input function, if the type has one */
	bool		has_recv;
} LlmfdwColumn;

extern PyObject *llmfdw_get_instance(Oid foreigntableid);
extern List *llmfdw_import_foreign_schema(ImportForeignSchemaStmt *stmt, Oid serverOid);
extern void llmfdw_check_options(const char *func, List *options);
extern LlmfdwColumn *llmfdw_columns(TupleDesc desc);

/* ---- quals.c ---- */

/* A restriction clause the FDW class can use: column OP value. */
typedef struct LlmfdwQual
{
	AttrNumber	attnum;
	char	   *opname;			/* "=", "<>", "~~", ... */
	bool		is_array;		/* column OP ANY/ALL (array) */
	bool		use_or;			/* ANY (true) or ALL (false) */
	bool		is_null_test;	/* IS [NOT] NULL: value is always NULL */
	Expr	   *value;			/* right-hand side; NULL for null tests */
	ExprState  *value_state;	/* initialised at executor start */
	Oid			value_type;
	Datum		datum;			/* the value, once evaluated */
	bool		isnull;
} LlmfdwQual;

extern List *llmfdw_extract_quals(List *clauses, Index relid);
extern void llmfdw_init_quals(List *quals, PlanState *parent);
extern void llmfdw_eval_quals(List *quals, ExprContext *econtext);
extern PyObject *llmfdw_quals_to_python(List *quals, LlmfdwColumn *columns,
										bool values_known);
extern List *llmfdw_join_clauses_for(PlannerInfo *root, RelOptInfo *rel,
									 AttrNumber attnum);

/* ---- convert.c ---- */

/* One result row as text-format strings, between the two conversion steps. */
typedef struct LlmfdwRowStrings
{
	char	  **values;
	int		   *lengths;
	bool	   *nulls;
	bool	   *binary;			/* bytes: raw bytea, or the type's binary format */
} LlmfdwRowStrings;

extern PyObject *llmfdw_datum_to_python(Datum value, bool isnull, Oid typid);
extern bool llmfdw_row_to_strings(PyObject *item, LlmfdwColumn *columns, int natts,
								  Bitmapset *needed, LlmfdwRowStrings *row);
extern void llmfdw_strings_to_slot(TupleTableSlot *slot, LlmfdwColumn *columns,
								   LlmfdwRowStrings *row);
extern void llmfdw_column_error_context(void *arg);
extern PyObject *llmfdw_column_names(Bitmapset *attnos, LlmfdwColumn *columns);

/* ---- batchjoin.c ---- */

extern PGDLLEXPORT Datum llmfdw_handler(PG_FUNCTION_ARGS);
extern void llmfdw_batchjoin_init(void);

#endif							/* LLMFDW_H */
