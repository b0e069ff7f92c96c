/*-------------------------------------------------------------------------
 *
 * llmfdw.h
 *		  Shared declarations of the llmfdw FDW host: a foreign-data wrapper
 *		  that runs FDW classes written against Multicorn2's Python API in
 *		  an embedded CPython interpreter.
 *
 * Files, by concern and phase (as contrib/postgres_fdw and pgvector split
 * theirs):
 *	llmfdw.c		module init, GUCs, the handler
 *	option.c		where each option may be set; the validator
 *	plan.c			planner: rel size, paths, sort/limit pushdown, request checks
 *	scan.c			executor of the foreign scan, and its EXPLAIN
 *	rowsource.c		execute() and its rows, for both scan nodes
 *	batchjoin_plan.c	batched nested loop: the planner hook, costs, plan
 *	batchjoin_exec.c	batched nested loop: the executor, EXPLAIN
 *	python.c		the interpreter: start-up, GIL, signals, errors, host module
 *	instance.c		per-table FDW instances: options, columns, cache
 *	quals.c			restriction clauses -> Multicorn Qual objects
 *	convert.c		Datum <-> Python values
 *	vectorizer.c	the vectorizer's background workers (llm.create_vectorizer)
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
#include "nodes/extensible.h"
#include "nodes/parsenodes.h"
#include "nodes/pathnodes.h"

/* GUC: directories prepended to the embedded interpreter's sys.path. */
extern char *llmfdw_python_path;

/* GUC: start Python in the postmaster when preloaded (python.c). */
extern bool llmfdw_preload_python;

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
extern void llmfdw_python_preload(void);
extern void llmfdw_enter(LlmfdwPyState *st);
extern void llmfdw_leave(LlmfdwPyState *st);
pg_noreturn extern void llmfdw_raise_python_error(LlmfdwPyState *st, const char *context);
extern PyObject *llmfdw_import_attr(const char *module, const char *attr);
extern PyObject *llmfdw_multicorn_attr(const char *attr);

/*
 * Cancels while Python runs (see python.c): llmfdw_interrupt_pending() lets
 * signals through and says whether the query must stop; long C loops over
 * Python objects ask every LLMFDW_INTERRUPT_EVERY items and, on true, set
 * QueryCanceled and fail.  llmfdw_free_later() drops a big garbage object in
 * another thread, so a cancel does not wait for it.  GIL held for all three.
 */
#define LLMFDW_INTERRUPT_EVERY 4096
extern bool llmfdw_interrupt_pending(void);
extern void llmfdw_set_query_canceled(void);
extern void llmfdw_free_later(PyObject *garbage);

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
extern AttrNumber llmfdw_attnum_by_name(LlmfdwColumn *columns, int natts, const char *name);
extern List *llmfdw_attnums_of(PyObject *instance, const char *attr,
							   LlmfdwColumn *columns, int natts);
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

/* ---- rowsource.c ---- */

/*
 * Where both scan nodes get their rows: a call of the FDW class's execute()
 * and the iterator it returns, and the conversion of each row into a slot.
 * The foreign scan makes one call per (re)scan; the batched join one per
 * request of a batch.  Its Python objects are released when the memory
 * context it was set up in is reset, so an aborted query, which never
 * reaches the end callbacks, still closes the generator (and with it the
 * gRPC call).
 */
typedef struct LlmfdwRowSource
{
	PyObject   *instance;		/* the table's FDW class instance */
	PyObject   *iterator;		/* execute()'s rows; NULL when none runs */
	PyObject   *quals;			/* the quals execute() was given, while it runs */
	LlmfdwColumn *columns;
	int			natts;
	Bitmapset  *needed;			/* attnos the query reads */
	LlmfdwRowStrings row;		/* the current row, between the two steps */
	MemoryContextCallback cleanup;
} LlmfdwRowSource;

extern void llmfdw_release_python(PyObject **objs, int n);
extern void llmfdw_rowsource_init(LlmfdwRowSource *src, Oid foreigntableid,
								  TupleDesc desc, MemoryContext query_cxt);
extern bool llmfdw_rowsource_start(LlmfdwRowSource *src, LlmfdwPyState *st,
								   PyObject *quals, PyObject *kwargs);
extern PyObject *llmfdw_rowsource_fetch(LlmfdwRowSource *src, LlmfdwPyState *st);
extern void llmfdw_rowsource_convert(LlmfdwRowSource *src, LlmfdwPyState *st,
									 PyObject *item);
extern void llmfdw_rowsource_store(LlmfdwRowSource *src, TupleTableSlot *slot);
extern void llmfdw_rowsource_stop(LlmfdwRowSource *src);
extern void llmfdw_rowsource_release(LlmfdwRowSource *src);

/* ---- plan.c ---- */

/* Planner state of a foreign scan, in baserel->fdw_private. */
typedef struct LlmfdwPlan
{
	PyObject   *instance;
	LlmfdwColumn *columns;
	int			natts;
	int			width;
	Cost		startup_cost;
	List	   *request_attnums;	/* the class's request_columns, as attnums */
	List	   *sortkeys;		/* sort keys can_sort() accepted (see sort_key) */
	List	   *sort_pathkeys;	/* their PathKeys */
	bool		sort_pushed_down;	/* they cover the query's ORDER BY */
} LlmfdwPlan;

/*
 * Indexes of the ForeignScan's fdw_private list (as postgres_fdw names its
 * FdwScanPrivateIndex).
 */
enum FdwScanPrivateIndex
{
	/* Integer list of the attnos the query reads */
	FdwScanPrivateNeededColumns,
	/* List of the sort keys execute() sorts by (see sort_key) */
	FdwScanPrivateSortKeys,
	/* Integer: LIMIT execute() applies, -1 for none */
	FdwScanPrivateLimit,
	/* Integer: OFFSET execute() applies, -1 for none */
	FdwScanPrivateOffset,
};

extern void llmfdwGetForeignRelSize(PlannerInfo *root, RelOptInfo *baserel,
									Oid foreigntableid);
extern void llmfdwGetForeignPaths(PlannerInfo *root, RelOptInfo *baserel,
								  Oid foreigntableid);
extern void llmfdwGetForeignUpperPaths(PlannerInfo *root, UpperRelationKind stage,
									   RelOptInfo *input_rel, RelOptInfo *output_rel,
									   void *extra);
extern ForeignScan *llmfdwGetForeignPlan(PlannerInfo *root, RelOptInfo *baserel,
										 Oid foreigntableid, ForeignPath *best_path,
										 List *tlist, List *scan_clauses,
										 Plan *outer_plan);
extern List *llmfdwPlanForeignModify(PlannerInfo *root, ModifyTable *plan,
									 Index resultRelation, int subplan_index);
extern PyObject *llmfdw_sortkeys_to_python(List *keys);

/* ---- scan.c ---- */

extern void llmfdwBeginForeignScan(ForeignScanState *node, int eflags);
extern TupleTableSlot *llmfdwIterateForeignScan(ForeignScanState *node);
extern void llmfdwReScanForeignScan(ForeignScanState *node);
extern void llmfdwEndForeignScan(ForeignScanState *node);
extern void llmfdwExplainForeignScan(ForeignScanState *node, struct ExplainState *es);

/* ---- batchjoin_plan.c, batchjoin_exec.c ---- */

#define BATCHJOIN_NAME "LLM Batched Nested Loop"

/*
 * What the planner hands the executor: positions in CustomScan.custom_private
 * (plain nodes, so that plans copy and serialize) and in custom_exprs.
 */
enum BatchJoinPrivateIndex
{
	BatchJoinPrivateJoinType,
	BatchJoinPrivateBatchSize,
	BatchJoinPrivateTable,
	BatchJoinPrivateKeyAttnums,
	BatchJoinPrivateScanMap,	/* per scan column: inner attnum, or -1 */
	BatchJoinPrivateNOuter,		/* leading scan columns from the outer plan */
};

enum BatchJoinExprsIndex
{
	BatchJoinExprsKeys,			/* outer expression supplying each key */
	BatchJoinExprsRestrict,		/* the inner rel's own restrictions */
	BatchJoinExprsJoin,			/* decide whether a pair matches */
};

extern const CustomScanMethods llmfdw_batchjoin_scan_methods;
extern void llmfdw_batchjoin_init(void);

/* ---- llmfdw.c ---- */

extern PGDLLEXPORT Datum llmfdw_handler(PG_FUNCTION_ARGS);

/* ---- vectorizer.c ---- */

extern void llmfdw_vectorizer_init(void);	/* GUCs, background workers */

#endif							/* LLMFDW_H */
