/*-------------------------------------------------------------------------
 *
 * scan.c
 *		  The executor callbacks of the llmfdw foreign scan, and its EXPLAIN.
 *
 * Each (re)scan makes one execute() call with the quals (Params evaluated)
 * and whatever sort, LIMIT and OFFSET plan.c pushed down; rows come from the
 * row source (rowsource.c) that the batched join uses too.
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include "commands/explain.h"
#if PG_VERSION_NUM >= 180000
#include "commands/explain_format.h"
#include "commands/explain_state.h"
#endif
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/rel.h"

/* Executor state, in node->fdw_state. */
typedef struct LlmfdwScan
{
	LlmfdwRowSource src;
	bool		done;			/* execute() returned None or its last row */
	List	   *quals;			/* LlmfdwQual */
	List	   *sortkeys;		/* pushed-down ORDER BY (see sort_key), or NIL */
	int			limit;			/* pushed-down LIMIT, or -1 */
	int			offset;			/* pushed-down OFFSET, or -1 */
} LlmfdwScan;

void
llmfdwBeginForeignScan(ForeignScanState *node, int eflags)
{
	ForeignScan *fsplan = (ForeignScan *) node->ss.ps.plan;
	Relation	rel = node->ss.ss_currentRelation;
	LlmfdwScan *scan = palloc0(sizeof(LlmfdwScan));
	ListCell   *lc;

	llmfdw_rowsource_init(&scan->src, RelationGetRelid(rel), RelationGetDescr(rel),
						  node->ss.ps.state->es_query_cxt);
	foreach(lc, (List *) list_nth(fsplan->fdw_private, FdwScanPrivateNeededColumns))
		scan->src.needed = bms_add_member(scan->src.needed, lfirst_int(lc));
	scan->sortkeys = list_nth(fsplan->fdw_private, FdwScanPrivateSortKeys);
	scan->limit = intVal(list_nth(fsplan->fdw_private, FdwScanPrivateLimit));
	scan->offset = intVal(list_nth(fsplan->fdw_private, FdwScanPrivateOffset));
	scan->quals = llmfdw_extract_quals(fsplan->fdw_exprs, fsplan->scan.scanrelid);
	llmfdw_init_quals(scan->quals, &node->ss.ps);
	node->fdw_state = scan;
}

/*
 * execute()'s and explain()'s keyword arguments, as Multicorn2 passes them:
 * sortkeys only when a sort is pushed down, limit and offset only when
 * they are.  A new dict, or NULL with a Python error set.  GIL held.
 */
static PyObject *
scan_kwargs(LlmfdwScan *scan)
{
	PyObject   *kwargs = PyDict_New();
	PyObject   *v;

	if (kwargs != NULL && scan->sortkeys != NIL)
	{
		v = llmfdw_sortkeys_to_python(scan->sortkeys);
		if (v == NULL || PyDict_SetItemString(kwargs, "sortkeys", v) < 0)
			Py_CLEAR(kwargs);
		Py_XDECREF(v);
	}
	if (kwargs != NULL && scan->limit >= 0)
	{
		v = PyLong_FromLong(scan->limit);
		if (v == NULL || PyDict_SetItemString(kwargs, "limit", v) < 0)
			Py_CLEAR(kwargs);
		Py_XDECREF(v);
	}
	if (kwargs != NULL && scan->offset >= 0)
	{
		v = PyLong_FromLong(scan->offset);
		if (v == NULL || PyDict_SetItemString(kwargs, "offset", v) < 0)
			Py_CLEAR(kwargs);
		Py_XDECREF(v);
	}
	return kwargs;
}

/* Call execute(quals, columns[, sortkeys=, limit=, offset=]) with the quals' values now. */
static void
start_execute(ForeignScanState *node, LlmfdwScan *scan)
{
	LlmfdwPyState st;

	llmfdw_eval_quals(scan->quals, node->ss.ps.ps_ExprContext);

	LLMFDW_WITH_PYTHON(st);
	{
		PyObject   *pyquals = llmfdw_quals_to_python(scan->quals, scan->src.columns, true);
		PyObject   *kwargs = pyquals ? scan_kwargs(scan) : NULL;

		if (kwargs == NULL)
		{
			Py_XDECREF(pyquals);
			llmfdw_raise_python_error(&st, "calling execute()");
		}
		scan->done = !llmfdw_rowsource_start(&scan->src, &st, pyquals, kwargs);
	}
	LLMFDW_END_PYTHON(st);
}

TupleTableSlot *
llmfdwIterateForeignScan(ForeignScanState *node)
{
	LlmfdwScan *scan = node->fdw_state;
	TupleTableSlot *slot = node->ss.ss_ScanTupleSlot;
	bool		got_row = false;
	LlmfdwPyState st;

	ExecClearTuple(slot);
	if (scan->done)
		return slot;
	if (scan->src.iterator == NULL)
	{
		start_execute(node, scan);
		if (scan->done)
			return slot;
	}

	LLMFDW_WITH_PYTHON(st);
	{
		MemoryContext old = MemoryContextSwitchTo(node->ss.ps.ps_ExprContext->ecxt_per_tuple_memory);
		PyObject   *item = llmfdw_rowsource_fetch(&scan->src, &st);

		/* a None row ends the scan, as in Multicorn2 */
		if (item != NULL && item != Py_None)
		{
			llmfdw_rowsource_convert(&scan->src, &st, item);
			got_row = true;
		}
		else
			Py_XDECREF(item);
		MemoryContextSwitchTo(old);
	}
	LLMFDW_END_PYTHON(st);

	if (!got_row)
	{
		scan->done = true;
		return slot;
	}
	llmfdw_rowsource_store(&scan->src, slot);
	return slot;
}

/* New parameter values: drop the iterator; the next Iterate calls execute() again. */
void
llmfdwReScanForeignScan(ForeignScanState *node)
{
	LlmfdwScan *scan = node->fdw_state;

	llmfdw_rowsource_stop(&scan->src);
	scan->done = false;
}

void
llmfdwEndForeignScan(ForeignScanState *node)
{
	LlmfdwScan *scan = node->fdw_state;
	LlmfdwPyState st;

	if (scan == NULL)
		return;
	llmfdwReScanForeignScan(node);
	if (scan->src.instance != NULL)
	{
		LLMFDW_WITH_PYTHON(st);
		{
			if (PyObject_HasAttrString(scan->src.instance, "end_scan"))
			{
				PyObject   *r = PyObject_CallMethod(scan->src.instance, "end_scan", NULL);

				if (r == NULL)
					llmfdw_raise_python_error(&st, "calling end_scan()");
				Py_DECREF(r);
			}
		}
		LLMFDW_END_PYTHON(st);
	}
	llmfdw_rowsource_release(&scan->src);
}

/*
 * EXPLAIN: the lines the FDW's explain() returns, values of Params as None,
 * each labelled "Multicorn" as Multicorn2 does (or the class's explain_label:
 * "LLM" for the llm.* tables).  VERBOSE also shows a pushed-down sort and
 * limit (plain EXPLAIN shows them as the Sort and Limit nodes that are not
 * there).
 */
void
llmfdwExplainForeignScan(ForeignScanState *node, ExplainState *es)
{
	LlmfdwScan *scan = node->fdw_state;
	LlmfdwPyState st;
	List	   *lines = NIL;
	ListCell   *lc;
	char	   *label = "Multicorn";

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

		if (PyObject_HasAttrString(scan->src.instance, "explain_label"))
		{
			PyObject   *l = PyObject_GetAttrString(scan->src.instance, "explain_label");

			if (l != NULL && PyUnicode_Check(l))
			{
				char	   *text = llmfdw_python_to_server(l);

				if (text != NULL)
					label = text;
			}
			Py_XDECREF(l);
			PyErr_Clear();
		}
		if (!PyObject_HasAttrString(scan->src.instance, "explain"))
			goto done;
		pyquals = llmfdw_quals_to_python(scan->quals, scan->src.columns, false);
		pycols = pyquals ? llmfdw_column_names(scan->src.needed, scan->src.columns) : NULL;
		meth = PyObject_GetAttrString(scan->src.instance, "explain");
		args = pycols ? PyTuple_Pack(2, pyquals, pycols) : NULL;
		kwargs = scan_kwargs(scan);
		if (kwargs != NULL &&
			PyDict_SetItemString(kwargs, "verbose", es->verbose ? Py_True : Py_False) < 0)
			Py_CLEAR(kwargs);
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
			char	   *line = s ? llmfdw_python_to_server(s) : NULL;

			Py_XDECREF(s);
			Py_DECREF(item);
			if (line == NULL)
				break;
			lines = lappend(lines, line);
		}
		Py_DECREF(iter);
		if (PyErr_Occurred())
			llmfdw_raise_python_error(&st, "calling explain()");
done:
		;
	}
	LLMFDW_END_PYTHON(st);

	foreach(lc, lines)
		ExplainPropertyText(label, (char *) lfirst(lc), es);
	if (es->verbose && scan->sortkeys != NIL)
	{
		StringInfoData buf;

		initStringInfo(&buf);
		foreach(lc, scan->sortkeys)
		{
			List	   *key = lfirst(lc);
			bool		reversed = boolVal(lthird(key));

			appendStringInfo(&buf, "%s%s", buf.len > 0 ? ", " : "",
							 quote_identifier(strVal(linitial(key))));
			if (strVal(list_nth(key, 4))[0])
				appendStringInfo(&buf, " COLLATE %s", quote_identifier(strVal(list_nth(key, 4))));
			if (reversed)
				appendStringInfoString(&buf, " DESC");
			if (boolVal(lfourth(key)) != reversed)
				appendStringInfoString(&buf, boolVal(lfourth(key)) ? " NULLS FIRST" : " NULLS LAST");
		}
		ExplainPropertyText("Pushed Down Sort Key", buf.data, es);
	}
	if (es->verbose && scan->limit >= 0)
		ExplainPropertyInteger("Pushed Down Limit", NULL, scan->limit, es);
	if (es->verbose && scan->offset >= 0)
		ExplainPropertyInteger("Pushed Down Offset", NULL, scan->offset, es);
}
