/*-------------------------------------------------------------------------
 *
 * llmfdw.c
 *		  Handler, validator, GUCs, and the planner and executor callbacks of
 *		  the llmfdw FDW host.
 *
 * A foreign server names a Python class (option "wrapper") written against
 * Multicorn2's API; each scan calls its get_rel_size / get_path_keys /
 * execute / explain / end_scan methods.  Parameterized paths built from
 * get_path_keys make joins reach the FDW as one qual per outer row.
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include "access/reloptions.h"
#include "access/table.h"
#include "catalog/pg_foreign_server.h"
#include "catalog/pg_foreign_table.h"
#include "commands/defrem.h"
#include "commands/explain.h"
#include "commands/explain_format.h"
#include "commands/explain_state.h"
#include "foreign/fdwapi.h"
#include "foreign/foreign.h"
#include "miscadmin.h"
#include "optimizer/optimizer.h"
#include "optimizer/pathnode.h"
#include "optimizer/planmain.h"
#include "optimizer/restrictinfo.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/rel.h"

PG_MODULE_MAGIC_EXT(.name = "llmfdw",.version = "0.1.0");

char	   *llmfdw_python_path = NULL;

/* Planner state, in baserel->fdw_private. */
typedef struct LlmfdwPlan
{
	PyObject   *instance;
	LlmfdwColumn *columns;
	int			natts;
	int			width;
	Cost		startup_cost;
} LlmfdwPlan;

/* Executor state, in node->fdw_state. */
typedef struct LlmfdwScan
{
	PyObject   *instance;
	PyObject   *iterator;		/* NULL until the first Iterate after (re)start */
	bool		done;
	LlmfdwColumn *columns;
	int			natts;
	Bitmapset  *needed;			/* attnos the query reads */
	List	   *quals;			/* LlmfdwQual */
	LlmfdwRowStrings row;
	MemoryContextCallback cleanup;
} LlmfdwScan;

PG_FUNCTION_INFO_V1(llmfdw_handler);
PG_FUNCTION_INFO_V1(llmfdw_validator);

void
_PG_init(void)
{
	DefineCustomStringVariable("llmfdw.python_path",
							   "Directories put in front of the embedded Python's sys.path.",
							   "Colon-separated; normally the site-packages of the venv that has llmfdw installed. "
							   "Read when a backend first starts Python.",
							   &llmfdw_python_path,
							   "",
							   PGC_SUSET, 0,
							   NULL, NULL, NULL);
	MarkGUCPrefixReserved("llmfdw");
}

/* ---------------------------------------------------------------------
 * Python reference clean-up tied to memory contexts
 *
 * An aborted query never reaches EndForeignScan (Multicorn leaks its
 * generator then, #140); a callback on the query's memory context always
 * runs, so the generator is closed and its gRPC call cancelled.
 * --------------------------------------------------------------------- */

static void
release_python(PyObject **objs, int n)
{
	LlmfdwPyState st;
	bool		any = false;

	for (int i = 0; i < n; i++)
		any |= (objs[i] != NULL);
	if (!any)
		return;
	llmfdw_enter(&st);
	for (int i = 0; i < n; i++)
	{
		if (objs[i] != NULL && PyGen_Check(objs[i]))
		{
			PyObject   *r = PyObject_CallMethod(objs[i], "close", NULL);

			Py_XDECREF(r);
			PyErr_Clear();
		}
		Py_CLEAR(objs[i]);
	}
	llmfdw_leave(&st);
}

static void
plan_cleanup(void *arg)
{
	LlmfdwPlan *plan = arg;

	release_python(&plan->instance, 1);
}

static void
scan_cleanup(void *arg)
{
	LlmfdwScan *scan = arg;
	PyObject   *objs[2] = {scan->iterator, scan->instance};

	scan->iterator = NULL;
	scan->instance = NULL;
	release_python(objs, 2);
}

/* Attnos (1-based) referenced by the given expressions; all if whole-row. */
static Bitmapset *
needed_columns(List *exprs, Index relid, int natts)
{
	Bitmapset  *raw = NULL;
	Bitmapset  *result = NULL;
	int			x = -1;

	pull_varattnos((Node *) exprs, relid, &raw);
	while ((x = bms_next_member(raw, x)) >= 0)
	{
		AttrNumber	attno = x + FirstLowInvalidHeapAttributeNumber;

		if (attno == 0)
		{
			for (int i = 1; i <= natts; i++)
				result = bms_add_member(result, i);
			return result;
		}
		if (attno > 0)
			result = bms_add_member(result, attno);
	}
	return result;
}

static bool
has_method(PyObject *obj, const char *name)
{
	return PyObject_HasAttrString(obj, name);
}

/* ---------------------------------------------------------------------
 * Planner
 * --------------------------------------------------------------------- */

static void
llmfdwGetForeignRelSize(PlannerInfo *root, RelOptInfo *baserel, Oid foreigntableid)
{
	LlmfdwPlan *plan = palloc0(sizeof(LlmfdwPlan));
	MemoryContextCallback *cb = palloc0(sizeof(MemoryContextCallback));
	Relation	rel;
	int			natts;
	List	   *exprs;
	ListCell   *lc;
	Bitmapset  *needed;
	List	   *quals;
	double		rows = 100000000;
	LlmfdwPyState st;

	rel = table_open(foreigntableid, NoLock);
	natts = RelationGetDescr(rel)->natts;
	plan->natts = natts;
	plan->columns = llmfdw_columns(RelationGetDescr(rel));
	table_close(rel, NoLock);
	plan->width = natts * 100;
	plan->startup_cost = 20;

	plan->instance = llmfdw_get_instance(foreigntableid);
	cb->func = plan_cleanup;
	cb->arg = plan;
	MemoryContextRegisterResetCallback(CurrentMemoryContext, cb);

	exprs = list_copy(baserel->reltarget->exprs);
	foreach(lc, baserel->baserestrictinfo)
		exprs = lappend(exprs, ((RestrictInfo *) lfirst(lc))->clause);
	needed = needed_columns(exprs, baserel->relid, natts);
	quals = llmfdw_extract_quals(baserel->baserestrictinfo, baserel->relid);

	LLMFDW_WITH_PYTHON(st);
	{
		if (has_method(plan->instance, "get_rel_size"))
		{
			PyObject   *pyquals = llmfdw_quals_to_python(quals, plan->columns, false);
			PyObject   *pycols = pyquals ? llmfdw_column_names(needed, plan->columns) : NULL;
			PyObject   *res = pycols ? PyObject_CallMethod(plan->instance, "get_rel_size",
														  "OO", pyquals, pycols) : NULL;
			double		w = plan->width;

			Py_XDECREF(pyquals);
			Py_XDECREF(pycols);
			if (res == NULL)
				llmfdw_raise_python_error(&st, "calling get_rel_size()");
			if (!PyArg_ParseTuple(res, "dd", &rows, &w))
			{
				Py_DECREF(res);
				PyErr_Clear();
				PyErr_SetString(PyExc_TypeError,
								"get_rel_size() must return a (rows, width) tuple of numbers");
				llmfdw_raise_python_error(&st, "calling get_rel_size()");
			}
			Py_DECREF(res);
			plan->width = (int) w;
		}
		if (has_method(plan->instance, "_startup_cost"))
		{
			PyObject   *c = PyObject_GetAttrString(plan->instance, "_startup_cost");

			if (c && PyNumber_Check(c))
				plan->startup_cost = PyFloat_AsDouble(c);
			Py_XDECREF(c);
			PyErr_Clear();
		}
	}
	LLMFDW_END_PYTHON(st);

	baserel->rows = clamp_row_est(rows);
	baserel->fdw_private = plan;
}

/* One declared path key: the columns and the rows one lookup returns. */
typedef struct PathKeyDecl
{
	List	   *attnums;
	double		rows;
} PathKeyDecl;

static AttrNumber
attnum_by_name(LlmfdwColumn *columns, int natts, const char *name)
{
	for (int i = 0; i < natts; i++)
		if (!columns[i].dropped && strcmp(columns[i].name, name) == 0)
			return i + 1;
	return InvalidAttrNumber;
}

/* get_path_keys() -> [((col, ...), rows), ...] as C structs. */
static List *
declared_path_keys(LlmfdwPlan *plan)
{
	List	   *result = NIL;
	LlmfdwPyState st;

	LLMFDW_WITH_PYTHON(st);
	{
		PyObject   *keys;
		PyObject   *iter;
		PyObject   *item;

		if (!has_method(plan->instance, "get_path_keys"))
			goto done;
		keys = PyObject_CallMethod(plan->instance, "get_path_keys", NULL);
		if (keys == NULL)
			llmfdw_raise_python_error(&st, "calling get_path_keys()");
		iter = PyObject_GetIter(keys);
		Py_DECREF(keys);
		if (iter == NULL)
			llmfdw_raise_python_error(&st, "calling get_path_keys()");
		while ((item = PyIter_Next(iter)) != NULL)
		{
			PyObject   *cols;
			double		rows;
			PathKeyDecl *decl = palloc0(sizeof(PathKeyDecl));
			Py_ssize_t	n;

			if (!PyArg_ParseTuple(item, "Od", &cols, &rows) || !PySequence_Check(cols))
			{
				Py_DECREF(item);
				Py_DECREF(iter);
				PyErr_Clear();
				PyErr_SetString(PyExc_TypeError,
								"get_path_keys() must return [((column, ...), expected_rows), ...]");
				llmfdw_raise_python_error(&st, "calling get_path_keys()");
			}
			n = PySequence_Size(cols);
			for (Py_ssize_t i = 0; i < n; i++)
			{
				PyObject   *name = PySequence_GetItem(cols, i);
				const char *s = name ? PyUnicode_AsUTF8(name) : NULL;
				AttrNumber	attnum = s ? attnum_by_name(plan->columns, plan->natts, s) : InvalidAttrNumber;

				Py_XDECREF(name);
				PyErr_Clear();
				if (attnum == InvalidAttrNumber)
				{
					decl->attnums = NIL;
					break;
				}
				decl->attnums = lappend_int(decl->attnums, attnum);
			}
			decl->rows = rows;
			if (decl->attnums != NIL)
				result = lappend(result, decl);
			Py_DECREF(item);
		}
		Py_DECREF(iter);
		if (PyErr_Occurred())
			llmfdw_raise_python_error(&st, "calling get_path_keys()");
done:
		;
	}
	LLMFDW_END_PYTHON(st);
	return result;
}

static void
llmfdwGetForeignPaths(PlannerInfo *root, RelOptInfo *baserel, Oid foreigntableid)
{
	LlmfdwPlan *plan = baserel->fdw_private;
	ListCell   *lc;

	add_path(baserel, (Path *)
			 create_foreignscan_path(root, baserel, NULL, baserel->rows, 0,
									 plan->startup_cost,
									 plan->startup_cost + baserel->rows * plan->width,
									 NIL, NULL, NULL, NIL, NIL));

	/*
	 * For each declared key, and each way the key's first column can be
	 * supplied by other relations, a path parameterized by those relations.
	 */
	foreach(lc, declared_path_keys(plan))
	{
		PathKeyDecl *decl = lfirst(lc);
		List	   *first_choices = llmfdw_join_clauses_for(root, baserel,
															linitial_int(decl->attnums));
		ListCell   *lc2;
		List	   *seen = NIL;

		foreach(lc2, first_choices)
		{
			RestrictInfo *first = lfirst(lc2);
			Relids		required = bms_copy(first->clause_relids);
			bool		complete = true;
			ListCell   *lc3;
			ParamPathInfo *ppi;

			for_each_from(lc3, decl->attnums, 1)
			{
				List	   *more = llmfdw_join_clauses_for(root, baserel, lfirst_int(lc3));

				if (more == NIL)
				{
					complete = false;
					break;
				}
				required = bms_union(required, ((RestrictInfo *) linitial(more))->clause_relids);
			}
			if (!complete)
				break;
			required = bms_union(required, baserel->lateral_relids);
			required = bms_del_member(required, baserel->relid);
			if (bms_is_empty(required) || list_member(seen, required))
				continue;
			seen = lappend(seen, required);

			ppi = get_baserel_parampathinfo(root, baserel, required);
			add_path(baserel, (Path *)
					 create_foreignscan_path(root, baserel, NULL, decl->rows, 0,
											 plan->startup_cost,
											 plan->startup_cost + decl->rows * plan->width,
											 NIL, ppi->ppi_req_outer, NULL, NIL, NIL));
		}
	}
}

static ForeignScan *
llmfdwGetForeignPlan(PlannerInfo *root, RelOptInfo *baserel, Oid foreigntableid,
					 ForeignPath *best_path, List *tlist, List *scan_clauses,
					 Plan *outer_plan)
{
	LlmfdwPlan *plan = baserel->fdw_private;
	List	   *clauses = extract_actual_clauses(scan_clauses, false);
	List	   *exprs = list_concat(list_copy(baserel->reltarget->exprs), clauses);
	Bitmapset  *needed = needed_columns(exprs, baserel->relid, plan->natts);
	List	   *needed_list = NIL;
	int			x = -1;

	while ((x = bms_next_member(needed, x)) >= 0)
		needed_list = lappend_int(needed_list, x);

	/*
	 * Every clause is both rechecked (qual) and shown to the FDW (fdw_exprs),
	 * where the planner turns outer-relation Vars into Params for us.
	 */
	return make_foreignscan(tlist, clauses, baserel->relid,
							copyObject(clauses), list_make1(needed_list),
							NIL, NIL, outer_plan);
}

/* ---------------------------------------------------------------------
 * Executor
 * --------------------------------------------------------------------- */

static void
llmfdwBeginForeignScan(ForeignScanState *node, int eflags)
{
	ForeignScan *fsplan = (ForeignScan *) node->ss.ps.plan;
	Relation	rel = node->ss.ss_currentRelation;
	TupleDesc	desc = RelationGetDescr(rel);
	LlmfdwScan *scan = palloc0(sizeof(LlmfdwScan));
	ListCell   *lc;

	scan->natts = desc->natts;
	scan->columns = llmfdw_columns(desc);
	foreach(lc, (List *) linitial(fsplan->fdw_private))
		scan->needed = bms_add_member(scan->needed, lfirst_int(lc));
	scan->quals = llmfdw_extract_quals(fsplan->fdw_exprs, fsplan->scan.scanrelid);
	llmfdw_init_quals(scan->quals, &node->ss.ps);
	scan->row.values = palloc0(sizeof(char *) * scan->natts);
	scan->row.lengths = palloc0(sizeof(int) * scan->natts);
	scan->row.nulls = palloc0(sizeof(bool) * scan->natts);
	scan->row.binary = palloc0(sizeof(bool) * scan->natts);

	scan->instance = llmfdw_get_instance(RelationGetRelid(rel));
	scan->cleanup.func = scan_cleanup;
	scan->cleanup.arg = scan;
	MemoryContextRegisterResetCallback(node->ss.ps.state->es_query_cxt, &scan->cleanup);
	node->fdw_state = scan;
}

/* Call execute(quals, columns) and keep the iterator it returns. */
static void
start_execute(ForeignScanState *node, LlmfdwScan *scan)
{
	LlmfdwPyState st;

	llmfdw_eval_quals(scan->quals, node->ss.ps.ps_ExprContext);

	LLMFDW_WITH_PYTHON(st);
	{
		PyObject   *pyquals = llmfdw_quals_to_python(scan->quals, scan->columns, true);
		PyObject   *pycols = pyquals ? llmfdw_column_names(scan->needed, scan->columns) : NULL;
		PyObject   *result = pycols ? PyObject_CallMethod(scan->instance, "execute", "OO",
														  pyquals, pycols) : NULL;

		Py_XDECREF(pyquals);
		Py_XDECREF(pycols);
		if (result == NULL)
			llmfdw_raise_python_error(&st, "calling execute()");
		if (result == Py_None)
			scan->done = true;
		else
		{
			scan->iterator = PyObject_GetIter(result);
			if (scan->iterator == NULL)
			{
				Py_DECREF(result);
				llmfdw_raise_python_error(&st, "execute() must return an iterable");
			}
		}
		Py_DECREF(result);
	}
	LLMFDW_END_PYTHON(st);
}

static TupleTableSlot *
llmfdwIterateForeignScan(ForeignScanState *node)
{
	LlmfdwScan *scan = node->fdw_state;
	TupleTableSlot *slot = node->ss.ss_ScanTupleSlot;
	bool		got_row = false;
	LlmfdwPyState st;

	ExecClearTuple(slot);
	if (scan->done)
		return slot;
	if (scan->iterator == NULL)
	{
		start_execute(node, scan);
		if (scan->done)
			return slot;
	}

	LLMFDW_WITH_PYTHON(st);
	{
		MemoryContext old = MemoryContextSwitchTo(node->ss.ps.ps_ExprContext->ecxt_per_tuple_memory);
		PyObject   *item = PyIter_Next(scan->iterator);

		if (item == NULL && PyErr_Occurred())
			llmfdw_raise_python_error(&st, "iterating over the result of execute()");
		if (item != NULL && item != Py_None)
		{
			if (!llmfdw_row_to_strings(item, scan->columns, scan->natts,
									   scan->needed, &scan->row))
			{
				Py_DECREF(item);
				llmfdw_raise_python_error(&st, "converting a row returned by execute()");
			}
			got_row = true;
		}
		Py_XDECREF(item);
		MemoryContextSwitchTo(old);
	}
	LLMFDW_END_PYTHON(st);

	if (!got_row)
	{
		scan->done = true;
		return slot;
	}
	llmfdw_strings_to_slot(slot, scan->columns, &scan->row);
	return slot;
}

/* New parameter values: drop the iterator; the next Iterate calls execute() again. */
static void
llmfdwReScanForeignScan(ForeignScanState *node)
{
	LlmfdwScan *scan = node->fdw_state;
	PyObject   *it = scan->iterator;

	scan->iterator = NULL;
	scan->done = false;
	release_python(&it, 1);
}

static void
llmfdwEndForeignScan(ForeignScanState *node)
{
	LlmfdwScan *scan = node->fdw_state;
	LlmfdwPyState st;

	if (scan == NULL)
		return;
	llmfdwReScanForeignScan(node);
	if (scan->instance != NULL)
	{
		LLMFDW_WITH_PYTHON(st);
		{
			if (has_method(scan->instance, "end_scan"))
			{
				PyObject   *r = PyObject_CallMethod(scan->instance, "end_scan", NULL);

				if (r == NULL)
					llmfdw_raise_python_error(&st, "calling end_scan()");
				Py_DECREF(r);
			}
		}
		LLMFDW_END_PYTHON(st);
	}
	scan_cleanup(scan);
}

/* EXPLAIN: the lines the FDW's explain() returns, values of Params as None. */
static void
llmfdwExplainForeignScan(ForeignScanState *node, ExplainState *es)
{
	LlmfdwScan *scan = node->fdw_state;
	LlmfdwPyState st;
	List	   *lines = NIL;
	ListCell   *lc;

	LLMFDW_WITH_PYTHON(st);
	{
		PyObject   *pyquals;
		PyObject   *pycols;
		PyObject   *args;
		PyObject   *kwargs;
		PyObject   *meth;
		PyObject   *res;
		PyObject   *iter;
		PyObject   *item;

		if (!has_method(scan->instance, "explain"))
			goto done;
		pyquals = llmfdw_quals_to_python(scan->quals, scan->columns, false);
		pycols = pyquals ? llmfdw_column_names(scan->needed, scan->columns) : NULL;
		meth = PyObject_GetAttrString(scan->instance, "explain");
		args = pycols ? PyTuple_Pack(2, pyquals, pycols) : NULL;
		kwargs = Py_BuildValue("{s:O}", "verbose", es->verbose ? Py_True : Py_False);
		res = (meth && args && kwargs) ? PyObject_Call(meth, args, kwargs) : NULL;
		Py_XDECREF(pyquals);
		Py_XDECREF(pycols);
		Py_XDECREF(meth);
		Py_XDECREF(args);
		Py_XDECREF(kwargs);
		if (res == NULL)
			llmfdw_raise_python_error(&st, "calling explain()");
		iter = PyObject_GetIter(res);
		Py_DECREF(res);
		if (iter == NULL)
			llmfdw_raise_python_error(&st, "explain() must return an iterable of str");
		while ((item = PyIter_Next(iter)) != NULL)
		{
			PyObject   *s = PyObject_Str(item);
			const char *utf8 = s ? PyUnicode_AsUTF8(s) : NULL;

			if (utf8)
				lines = lappend(lines, pstrdup(utf8));
			Py_XDECREF(s);
			Py_DECREF(item);
		}
		Py_DECREF(iter);
		if (PyErr_Occurred())
			llmfdw_raise_python_error(&st, "calling explain()");
done:
		;
	}
	LLMFDW_END_PYTHON(st);

	foreach(lc, lines)
		ExplainPropertyText("LLM", (char *) lfirst(lc), es);
}

Datum
llmfdw_handler(PG_FUNCTION_ARGS)
{
	FdwRoutine *routine = makeNode(FdwRoutine);

	routine->GetForeignRelSize = llmfdwGetForeignRelSize;
	routine->GetForeignPaths = llmfdwGetForeignPaths;
	routine->GetForeignPlan = llmfdwGetForeignPlan;
	routine->BeginForeignScan = llmfdwBeginForeignScan;
	routine->IterateForeignScan = llmfdwIterateForeignScan;
	routine->ReScanForeignScan = llmfdwReScanForeignScan;
	routine->EndForeignScan = llmfdwEndForeignScan;
	routine->ExplainForeignScan = llmfdwExplainForeignScan;
	PG_RETURN_POINTER(routine);
}

/* ---------------------------------------------------------------------
 * Validator
 * --------------------------------------------------------------------- */

/*
 * "wrapper" belongs on the server, and must name an importable class: a
 * typo fails at CREATE SERVER, not at the first query.  Other options are
 * validated by the FDW class when it is instantiated.
 */
Datum
llmfdw_validator(PG_FUNCTION_ARGS)
{
	List	   *options = untransformRelOptions(PG_GETARG_DATUM(0));
	Oid			catalog = PG_GETARG_OID(1);
	char	   *wrapper = NULL;
	ListCell   *lc;
	LlmfdwPyState st;

	foreach(lc, options)
	{
		DefElem    *def = lfirst(lc);

		if (strcmp(def->defname, "wrapper") == 0)
		{
			if (catalog != ForeignServerRelationId)
				ereport(ERROR,
						(errcode(ERRCODE_FDW_INVALID_OPTION_NAME),
						 errmsg("the wrapper option belongs on the foreign server"),
						 errhint("CREATE SERVER name FOREIGN DATA WRAPPER llmfdw OPTIONS (wrapper 'package.module.Class')")));
			wrapper = defGetString(def);
		}
	}

	if (catalog == ForeignServerRelationId)
	{
		if (wrapper == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_FDW_OPTION_NAME_NOT_FOUND),
					 errmsg("a foreign server of llmfdw needs the wrapper option"),
					 errhint("CREATE SERVER name FOREIGN DATA WRAPPER llmfdw OPTIONS (wrapper 'package.module.Class')")));

		LLMFDW_WITH_PYTHON(st);
		{
			const char *dot = strrchr(wrapper, '.');
			PyObject   *cls = NULL;

			if (dot != NULL && dot != wrapper && dot[1] != '\0')
				cls = llmfdw_import_attr(pnstrdup(wrapper, dot - wrapper), dot + 1);
			else
				PyErr_Format(PyExc_ValueError,
							 "wrapper '%s' must be a dotted path: package.module.Class", wrapper);
			if (cls == NULL)
				llmfdw_raise_python_error(&st, psprintf("importing wrapper class %s", wrapper));
			Py_DECREF(cls);
		}
		LLMFDW_END_PYTHON(st);
	}
	PG_RETURN_VOID();
}
