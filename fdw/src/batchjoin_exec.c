/*-------------------------------------------------------------------------
 *
 * batchjoin_exec.c
 *		  The executor of the batched nested loop (planned by
 *		  batchjoin_plan.c, which says how it works), and its EXPLAIN.
 *
 * A batch: up to batch_size outer rows and their key values.  The Python
 * side (multicorn._batchjoin.BatchMatcher) groups them into requests and,
 * for each row the requests return, names the outer rows it belongs to;
 * the rows themselves come from the row source (rowsource.c) that the
 * foreign scan uses too.  This file keeps what runs per pair of rows:
 * building the scan tuple and rechecking the join clauses.
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include "access/table.h"
#include "commands/explain.h"
#if PG_VERSION_NUM >= 180000
#include "commands/explain_format.h"
#include "commands/explain_state.h"
#endif
#include "executor/executor.h"
#include "executor/tuptable.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/ruleutils.h"

/*
 * A batch also ends once its key values reach this size, well under the
 * sidecar's 64 MiB message limit: long texts that work one at a time must
 * not make a request the sidecar refuses.
 */
#define BATCH_MAX_BYTES (16 * 1024 * 1024)

typedef enum BatchPhase
{
	PHASE_INNER,				/* joining the rows the requests return */
	PHASE_UNMATCHED,			/* outer rows no inner row matched */
} BatchPhase;

typedef struct BatchJoinState
{
	CustomScanState css;
	JoinType	jointype;
	int			batch_size;
	int			nouter;			/* leading scan columns that come from outer */
	int		   *scan_map;		/* per scan column: inner attnum, or -1 */
	int			nscan;
	bool		needs_wholerow;
	Index		inner_rti;		/* the inner table's range table index */

	/* keys: the first is sent as = ANY(list), the others split groups */
	int			nkeys;
	AttrNumber *key_attnums;
	ExprState **key_states;
	Oid		   *key_types;
	int16	   *key_typlen;
	bool	   *key_typbyval;

	List	   *restrict_quals; /* LlmfdwQual: sent with every request */
	ExprState  *join_qual;		/* restrictions and join clauses, rechecked */

	/* the inner table */
	LlmfdwRowSource src;
	TupleTableSlot *inner_slot;
	Datum		wholerow;

	/* the current batch, in batch_cxt */
	MemoryContext batch_cxt;
	MemoryContext row_cxt;		/* the current inner row */
	TupleTableSlot *outer_row_slot;
	MinimalTuple *rows;
	bool	   *matched;
	Datum	   *key_values;		/* nrows x nkeys */
	bool	   *key_nulls;
	int			nrows;
	bool		outer_done;
	BatchPhase	phase;
	int			unmatched_pos;

	/* requests of the batch */
	PyObject   *matcher;		/* multicorn._batchjoin.BatchMatcher */
	PyObject   *rows_for;		/* its rows_for method, called once per row */
	PyObject   *requests;		/* list of qual lists, one per execute() */
	Py_ssize_t	next_request;
	int		   *matches;		/* rows the current inner row belongs to */
	int			nmatches;
	int			match_pos;

	/* EXPLAIN ANALYZE */
	int64		nbatches;
	int64		nrequests;

	MemoryContextCallback cleanup;
} BatchJoinState;

static const CustomExecMethods batchjoin_exec_methods;

static Node *
batchjoin_create_state(CustomScan *cscan)
{
	BatchJoinState *bj = (BatchJoinState *) newNode(sizeof(BatchJoinState), T_CustomScanState);

	bj->css.methods = &batchjoin_exec_methods;
	return (Node *) bj;
}

/* Drop the batch's requests and the running one (closing it cancels its calls). */
static void
release_batch(BatchJoinState *bj)
{
	llmfdw_rowsource_stop(&bj->src);
	llmfdw_release_python(&bj->requests, 1);
}

/*
 * An aborted query never reaches EndCustomScan; its memory context reset
 * does.  (The row source has a callback of its own.)
 */
static void
batchjoin_cleanup(void *arg)
{
	BatchJoinState *bj = arg;
	PyObject   *objs[3] = {bj->requests, bj->rows_for, bj->matcher};

	bj->requests = NULL;
	bj->rows_for = NULL;
	bj->matcher = NULL;
	llmfdw_release_python(objs, 3);
}

/*
 * The BatchMatcher of the node: the key columns' names, and their positions
 * among the table's live columns (rows may be sequences).  Its rows_for, a
 * bound method looked up once, goes in bj->rows_for.
 */
static PyObject *
new_matcher(BatchJoinState *bj)
{
	PyObject   *matcher = NULL;
	LlmfdwPyState st;

	LLMFDW_WITH_PYTHON(st);
	{
		PyObject   *cls = llmfdw_import_attr("multicorn._batchjoin", "BatchMatcher");
		PyObject   *names = cls ? PyTuple_New(bj->nkeys) : NULL;
		PyObject   *positions = names ? PyTuple_New(bj->nkeys) : NULL;

		for (int k = 0; positions != NULL && k < bj->nkeys; k++)
		{
			AttrNumber	attnum = bj->key_attnums[k];
			PyObject   *name = llmfdw_text_to_python(bj->src.columns[attnum - 1].name, -1);
			long		position = 0;

			for (int a = 1; a < attnum; a++)
				position += !bj->src.columns[a - 1].dropped;
			PyTuple_SET_ITEM(positions, k, PyLong_FromLong(position));
			if (name == NULL || PyTuple_GET_ITEM(positions, k) == NULL)
			{
				Py_XDECREF(name);
				Py_CLEAR(positions);
				break;
			}
			PyTuple_SET_ITEM(names, k, name);
		}
		matcher = positions ? PyObject_CallFunctionObjArgs(cls, names, positions, NULL) : NULL;
		Py_XDECREF(cls);
		Py_XDECREF(names);
		Py_XDECREF(positions);
		bj->rows_for = matcher ? PyObject_GetAttrString(matcher, "rows_for") : NULL;
		if (bj->rows_for == NULL)
		{
			Py_XDECREF(matcher);
			llmfdw_raise_python_error(&st, "preparing a batched join");
		}
	}
	LLMFDW_END_PYTHON(st);
	return matcher;
}

static void
batchjoin_begin(CustomScanState *node, EState *estate, int eflags)
{
	BatchJoinState *bj = (BatchJoinState *) node;
	CustomScan *cscan = (CustomScan *) node->ss.ps.plan;
	List	   *priv = cscan->custom_private;
	List	   *keys = list_nth(cscan->custom_exprs, BatchJoinExprsKeys);
	List	   *restricts = list_nth(cscan->custom_exprs, BatchJoinExprsRestrict);
	List	   *joins = list_nth(cscan->custom_exprs, BatchJoinExprsJoin);
	List	   *key_attnums = list_nth(priv, BatchJoinPrivateKeyAttnums);
	List	   *scan_map = list_nth(priv, BatchJoinPrivateScanMap);
	Oid			table = (Oid) intVal(list_nth(priv, BatchJoinPrivateTable));
	PlanState  *outer;
	Relation	rel;
	TupleDesc	desc;
	ListCell   *lc;
	ListCell   *lc2;

	bj->jointype = (JoinType) intVal(list_nth(priv, BatchJoinPrivateJoinType));
	bj->batch_size = intVal(list_nth(priv, BatchJoinPrivateBatchSize));
	bj->nouter = intVal(list_nth(priv, BatchJoinPrivateNOuter));
	bj->nscan = list_length(scan_map);
	bj->inner_rti = ((Var *) ((TargetEntry *) list_nth(cscan->custom_scan_tlist, bj->nouter))->expr)->varno;
	bj->scan_map = palloc(sizeof(int) * bj->nscan);
	foreach(lc, scan_map)
	{
		bj->scan_map[foreach_current_index(lc)] = lfirst_int(lc);
		bj->needs_wholerow |= (lfirst_int(lc) == 0);
	}

	outer = ExecInitNode(linitial(cscan->custom_plans), estate, eflags);
	node->custom_ps = list_make1(outer);
	bj->outer_row_slot = ExecInitExtraTupleSlot(estate, ExecGetResultType(outer),
												&TTSOpsMinimalTuple);

	rel = table_open(table, AccessShareLock);
	desc = CreateTupleDescCopy(RelationGetDescr(rel));
	table_close(rel, AccessShareLock);
	llmfdw_rowsource_init(&bj->src, table, desc, estate->es_query_cxt);
	bj->inner_slot = ExecInitExtraTupleSlot(estate, desc, &TTSOpsVirtual);
	for (int i = bj->nouter; i < bj->nscan; i++)
		for (int a = 1; a <= bj->src.natts; a++)
			if (bj->scan_map[i] == 0 || bj->scan_map[i] == a)
				bj->src.needed = bms_add_member(bj->src.needed, a);

	bj->nkeys = list_length(key_attnums);
	bj->key_attnums = palloc(sizeof(AttrNumber) * bj->nkeys);
	bj->key_states = palloc(sizeof(ExprState *) * bj->nkeys);
	bj->key_types = palloc(sizeof(Oid) * bj->nkeys);
	bj->key_typlen = palloc(sizeof(int16) * bj->nkeys);
	bj->key_typbyval = palloc(sizeof(bool) * bj->nkeys);
	forboth(lc, key_attnums, lc2, keys)
	{
		int			k = foreach_current_index(lc);
		AttrNumber	attnum = lfirst_int(lc);

		bj->key_attnums[k] = attnum;
		bj->src.needed = bms_add_member(bj->src.needed, attnum);
		bj->key_states[k] = ExecInitExpr(lfirst(lc2), &node->ss.ps);
		bj->key_types[k] = exprType(lfirst(lc2));
		get_typlenbyval(bj->key_types[k], &bj->key_typlen[k], &bj->key_typbyval[k]);
	}

	/*
	 * The restrictions' Vars now point into the scan tuple; map them back to
	 * the table's attnums to send them as quals.
	 */
	bj->restrict_quals = llmfdw_extract_quals(restricts, INDEX_VAR);
	foreach(lc, bj->restrict_quals)
	{
		LlmfdwQual *q = lfirst(lc);

		q->attnum = bj->scan_map[q->attnum - 1];
	}
	llmfdw_init_quals(bj->restrict_quals, &node->ss.ps);
	bj->join_qual = ExecInitQual(list_concat_copy(restricts, joins), &node->ss.ps);

	bj->batch_cxt = AllocSetContextCreate(estate->es_query_cxt, "llmfdw join batch",
										  ALLOCSET_DEFAULT_SIZES);
	bj->row_cxt = AllocSetContextCreate(estate->es_query_cxt, "llmfdw join inner row",
										ALLOCSET_DEFAULT_SIZES);
	bj->rows = palloc(sizeof(MinimalTuple) * bj->batch_size);
	bj->matched = palloc(sizeof(bool) * bj->batch_size);
	bj->key_values = palloc(sizeof(Datum) * bj->batch_size * bj->nkeys);
	bj->key_nulls = palloc(sizeof(bool) * bj->batch_size * bj->nkeys);
	bj->matches = palloc(sizeof(int) * bj->batch_size);
	bj->phase = PHASE_UNMATCHED;

	bj->cleanup.func = batchjoin_cleanup;
	bj->cleanup.arg = bj;
	MemoryContextRegisterResetCallback(estate->es_query_cxt, &bj->cleanup);
	bj->matcher = new_matcher(bj);
}

/* ---- the batch ---- */

/* Scan tuple columns from the outer side: an outer row's values. */
static void
set_outer_values(BatchJoinState *bj, TupleTableSlot *outer)
{
	TupleTableSlot *scan = bj->css.ss.ss_ScanTupleSlot;

	slot_getallattrs(outer);
	ExecClearTuple(scan);
	memcpy(scan->tts_values, outer->tts_values, sizeof(Datum) * bj->nouter);
	memcpy(scan->tts_isnull, outer->tts_isnull, sizeof(bool) * bj->nouter);
}

/* Scan tuple columns from the inner side: the current inner row's, or NULLs. */
static TupleTableSlot *
set_inner_values(BatchJoinState *bj, bool null_extended)
{
	TupleTableSlot *scan = bj->css.ss.ss_ScanTupleSlot;

	for (int p = bj->nouter; p < bj->nscan; p++)
	{
		int			attnum = bj->scan_map[p];

		scan->tts_isnull[p] = null_extended || (attnum > 0 && bj->inner_slot->tts_isnull[attnum - 1]);
		scan->tts_values[p] = scan->tts_isnull[p] ? (Datum) 0 :
			attnum == 0 ? bj->wholerow : bj->inner_slot->tts_values[attnum - 1];
	}
	return ExecStoreVirtualTuple(scan);
}

/* The scan tuple for batch row i joined with the current inner row (or NULLs). */
static TupleTableSlot *
set_pair(BatchJoinState *bj, int i, bool null_extended)
{
	ExecStoreMinimalTuple(bj->rows[i], bj->outer_row_slot, false);
	set_outer_values(bj, bj->outer_row_slot);
	return set_inner_values(bj, null_extended);
}

/*
 * The batch's key values for the BatchMatcher: per row, a tuple of them, or
 * None where one is NULL.  A new list, or NULL with a Python error.  GIL held.
 */
static PyObject *
batch_keys(BatchJoinState *bj)
{
	PyObject   *keys = PyList_New(bj->nrows);

	for (int i = 0; keys != NULL && i < bj->nrows; i++)
	{
		PyObject   *values = PyTuple_New(bj->nkeys);

		for (int k = 0; values != NULL && k < bj->nkeys; k++)
		{
			PyObject   *v;

			if (bj->key_nulls[i * bj->nkeys + k])
			{
				Py_SETREF(values, Py_NewRef(Py_None));
				break;
			}
			v = llmfdw_datum_to_python(bj->key_values[i * bj->nkeys + k], false, bj->key_types[k]);
			if (v == NULL)
				Py_CLEAR(values);
			else
				PyTuple_SET_ITEM(values, k, v);
		}
		if (values == NULL)
			Py_CLEAR(keys);
		else
			PyList_SET_ITEM(keys, i, values);
	}
	return keys;
}

/*
 * Read up to batch_size outer rows (fewer if their keys reach
 * BATCH_MAX_BYTES), evaluate their keys, and prepare the batch's requests.
 * Memory: the rows and keys of one batch only.
 */
static void
fill_batch(BatchJoinState *bj)
{
	PlanState  *outer = linitial(bj->css.custom_ps);
	ExprContext *econtext = bj->css.ss.ps.ps_ExprContext;
	Size		bytes = 0;
	LlmfdwPyState st;

	release_batch(bj);
	MemoryContextReset(bj->batch_cxt);
	MemoryContextReset(bj->row_cxt);
	bj->nrows = 0;
	bj->nmatches = bj->match_pos = 0;
	bj->unmatched_pos = 0;
	bj->next_request = 0;
	while (bj->nrows < bj->batch_size && bytes < BATCH_MAX_BYTES)
	{
		TupleTableSlot *slot;
		MemoryContext old;
		int			n = bj->nrows;

		CHECK_FOR_INTERRUPTS();
		slot = ExecProcNode(outer);
		if (TupIsNull(slot))
		{
			bj->outer_done = true;
			break;
		}
		set_outer_values(bj, slot);
		set_inner_values(bj, true);
		ResetExprContext(econtext);
		econtext->ecxt_scantuple = bj->css.ss.ss_ScanTupleSlot;
		old = MemoryContextSwitchTo(bj->batch_cxt);
		bj->rows[n] = ExecCopySlotMinimalTuple(slot);
		for (int k = 0; k < bj->nkeys; k++)
		{
			bool	   *isnull = &bj->key_nulls[n * bj->nkeys + k];
			Datum		v = ExecEvalExpr(bj->key_states[k], econtext, isnull);

			if (*isnull)
				continue;
			bj->key_values[n * bj->nkeys + k] = datumCopy(v, bj->key_typbyval[k], bj->key_typlen[k]);
			bytes += datumGetSize(v, bj->key_typbyval[k], bj->key_typlen[k]);
		}
		MemoryContextSwitchTo(old);
		bj->matched[n] = false;
		bj->nrows++;
	}
	bj->phase = PHASE_UNMATCHED;
	if (bj->nrows == 0)
		return;
	bj->nbatches++;

	ResetExprContext(econtext);
	llmfdw_eval_quals(bj->restrict_quals, econtext);
	LLMFDW_WITH_PYTHON(st);
	{
		PyObject   *restrictions = llmfdw_quals_to_python(bj->restrict_quals, bj->src.columns, true);
		PyObject   *keys = restrictions ? batch_keys(bj) : NULL;

		bj->requests = keys ? PyObject_CallMethod(bj->matcher, "new_batch", "OO",
												  restrictions, keys) : NULL;
		Py_XDECREF(restrictions);
		Py_XDECREF(keys);
		if (bj->requests != NULL && !PyList_Check(bj->requests))
		{
			Py_CLEAR(bj->requests);
			PyErr_SetString(PyExc_TypeError, "BatchMatcher.new_batch() must return a list");
		}
		if (bj->requests == NULL)
			llmfdw_raise_python_error(&st, "preparing the requests of a batched join");
	}
	LLMFDW_END_PYTHON(st);
	bj->phase = PHASE_INNER;
}

/* Call execute() with the next request's quals. */
static void
start_request(BatchJoinState *bj, LlmfdwPyState *st)
{
	PyObject   *quals = PyList_GET_ITEM(bj->requests, bj->next_request);

	bj->next_request++;
	bj->nrequests++;
	llmfdw_rowsource_start(&bj->src, st, Py_NewRef(quals), NULL);
}

/*
 * Which batch rows an inner row belongs to, by the key values it echoes,
 * into bj->matches; false (with a Python error) if the row lacks a key.
 */
static bool
match_row(BatchJoinState *bj, PyObject *item)
{
	PyObject   *rows = PyObject_CallOneArg(bj->rows_for, item);

	if (rows != NULL && !PyList_Check(rows))
	{
		Py_CLEAR(rows);
		PyErr_SetString(PyExc_TypeError, "BatchMatcher.rows_for() must return a list");
	}
	if (rows == NULL)
		return false;
	for (Py_ssize_t j = 0; j < PyList_GET_SIZE(rows) && j < bj->nrows; j++)
		bj->matches[bj->nmatches++] = (int) PyLong_AsLong(PyList_GET_ITEM(rows, j));
	Py_DECREF(rows);
	return !PyErr_Occurred();
}

/*
 * Fetch the next row the batch's requests return that belongs to some outer
 * row, into inner_slot, and the outer rows it belongs to into matches.
 * False when every request of the batch is done.
 */
static bool
next_inner_row(BatchJoinState *bj)
{
	bool		got = false;
	LlmfdwPyState st;

	MemoryContextReset(bj->row_cxt);
	bj->nmatches = bj->match_pos = 0;
	LLMFDW_WITH_PYTHON(st);
	{
		MemoryContext old = MemoryContextSwitchTo(bj->row_cxt);

		while (!got)
		{
			PyObject   *item;

			if (bj->src.iterator == NULL)
			{
				if (bj->next_request >= PyList_GET_SIZE(bj->requests))
					break;
				start_request(bj, &st);
				continue;
			}
			item = llmfdw_rowsource_fetch(&bj->src, &st);
			if (item == NULL)
				continue;		/* this request is done */
			if (!match_row(bj, item))
			{
				Py_DECREF(item);
				llmfdw_raise_python_error(&st, "matching a row returned by execute()");
			}
			if (bj->nmatches == 0)
			{
				Py_DECREF(item);
				continue;		/* a row no outer row asked for */
			}
			llmfdw_rowsource_convert(&bj->src, &st, item);
			got = true;
		}
		MemoryContextSwitchTo(old);
	}
	LLMFDW_END_PYTHON(st);

	if (got)
	{
		MemoryContext old = MemoryContextSwitchTo(bj->row_cxt);

		llmfdw_rowsource_store(&bj->src, bj->inner_slot);
		if (bj->needs_wholerow)
			bj->wholerow = ExecFetchSlotHeapTupleDatum(bj->inner_slot);
		MemoryContextSwitchTo(old);
	}
	return got;
}

/*
 * The next joined row, as the nested loop would make it: each inner row
 * with every outer row of its key that passes the join clauses; then, for
 * left and anti joins, the outer rows nothing matched.
 */
static TupleTableSlot *
batchjoin_next(ScanState *ss)
{
	BatchJoinState *bj = (BatchJoinState *) ss;
	ExprContext *econtext = ss->ps.ps_ExprContext;
	bool		once = (bj->jointype == JOIN_SEMI || bj->jointype == JOIN_ANTI);
	bool		keeps_outer = (bj->jointype == JOIN_LEFT || bj->jointype == JOIN_ANTI);

	for (;;)
	{
		CHECK_FOR_INTERRUPTS();
		while (bj->match_pos < bj->nmatches)
		{
			int			i = bj->matches[bj->match_pos++];

			if (once && bj->matched[i])
				continue;
			ResetExprContext(econtext);
			econtext->ecxt_scantuple = set_pair(bj, i, false);
			if (!ExecQual(bj->join_qual, econtext))
				continue;
			bj->matched[i] = true;
			if (bj->jointype != JOIN_ANTI)
				return ss->ss_ScanTupleSlot;
		}
		if (bj->phase == PHASE_INNER)
		{
			if (!next_inner_row(bj))
				bj->phase = PHASE_UNMATCHED;
			continue;
		}
		while (keeps_outer && bj->unmatched_pos < bj->nrows)
		{
			int			i = bj->unmatched_pos++;

			if (!bj->matched[i])
				return set_pair(bj, i, true);
		}
		if (bj->outer_done)
			return ExecClearTuple(ss->ss_ScanTupleSlot);
		fill_batch(bj);
	}
}

/*
 * EvalPlanQual (UPDATE ... FROM meeting a concurrent update): join the
 * outer plan's rows, now the updated versions, with the inner row the
 * original join used (its rowmark's copy), as a nested loop's inner scan
 * returns it, so a key the update changed no longer matches.
 */
static bool
batchjoin_recheck(ScanState *ss, TupleTableSlot *slot)
{
	BatchJoinState *bj = (BatchJoinState *) ss;
	EPQState   *epq = ss->ps.state->es_epq_active;
	PlanState  *outer = linitial(bj->css.custom_ps);
	ExprContext *econtext = ss->ps.ps_ExprContext;

	if (epq->relsubs_rowmark[bj->inner_rti - 1] == NULL)
	{
		TupleTableSlot *joined = batchjoin_next(ss);	/* no copy: join afresh */

		return !TupIsNull(joined);
	}
	for (;;)
	{
		TupleTableSlot *outer_slot = ExecProcNode(outer);
		bool		matched = false;

		if (TupIsNull(outer_slot))
			return false;
		set_outer_values(bj, outer_slot);
		MemoryContextReset(bj->row_cxt);
		if (EvalPlanQualFetchRowMark(epq, bj->inner_rti, bj->inner_slot))
		{
			MemoryContext old = MemoryContextSwitchTo(bj->row_cxt);

			slot_getallattrs(bj->inner_slot);
			if (bj->needs_wholerow)
				bj->wholerow = ExecFetchSlotHeapTupleDatum(bj->inner_slot);
			MemoryContextSwitchTo(old);
			ResetExprContext(econtext);
			econtext->ecxt_scantuple = set_inner_values(bj, false);
			matched = ExecQual(bj->join_qual, econtext);
		}
		if (matched && bj->jointype != JOIN_ANTI)
			return true;
		if (!matched && (bj->jointype == JOIN_LEFT || bj->jointype == JOIN_ANTI))
		{
			set_inner_values(bj, true);
			return true;
		}
	}
}

static TupleTableSlot *
batchjoin_exec(CustomScanState *node)
{
	return ExecScan(&node->ss, batchjoin_next, batchjoin_recheck);
}

static void
batchjoin_end(CustomScanState *node)
{
	BatchJoinState *bj = (BatchJoinState *) node;

	llmfdw_rowsource_release(&bj->src);
	batchjoin_cleanup(bj);
	ExecEndNode(linitial(node->custom_ps));
}

static void
batchjoin_rescan(CustomScanState *node)
{
	BatchJoinState *bj = (BatchJoinState *) node;
	PlanState  *outer = linitial(node->custom_ps);

	release_batch(bj);
	bj->nrows = 0;
	bj->nmatches = bj->match_pos = 0;
	bj->unmatched_pos = 0;
	bj->outer_done = false;
	bj->phase = PHASE_UNMATCHED;
	if (node->ss.ps.chgParam != NULL)
		UpdateChangedParamSet(outer, node->ss.ps.chgParam);
	if (outer->chgParam == NULL)
		ExecReScan(outer);
}

static const char *
jointype_name(JoinType jointype)
{
	switch (jointype)
	{
		case JOIN_LEFT:
			return "Left";
		case JOIN_SEMI:
			return "Semi";
		case JOIN_ANTI:
			return "Anti";
		default:
			return "Inner";
	}
}

/* EXPLAIN: the table, its keys and the batch size; with ANALYZE, what ran. */
static void
batchjoin_explain(CustomScanState *node, List *ancestors, ExplainState *es)
{
	BatchJoinState *bj = (BatchJoinState *) node;
	CustomScan *cscan = (CustomScan *) node->ss.ps.plan;
	Oid			table = (Oid) intVal(list_nth(cscan->custom_private, BatchJoinPrivateTable));
	List	   *context = set_deparse_context_plan(es->deparse_cxt, node->ss.ps.plan, ancestors);
	bool		useprefix = list_length(es->rtable) > 1 || es->verbose;
	List	   *rechecked = list_concat_copy(list_nth(cscan->custom_exprs, BatchJoinExprsRestrict),
											 list_nth(cscan->custom_exprs, BatchJoinExprsJoin));
	StringInfoData keys;
	ListCell   *lc;

	initStringInfo(&keys);
	foreach(lc, (List *) list_nth(cscan->custom_exprs, BatchJoinExprsKeys))
	{
		int			k = foreach_current_index(lc);
		const char *value = deparse_expression(lfirst(lc), context, useprefix, false);

		appendStringInfo(&keys, k == 0 ? "%s = ANY(%s)" : ", %s = %s",
						 quote_identifier(bj->src.columns[bj->key_attnums[k] - 1].name), value);
	}
	ExplainPropertyText("Join Type", jointype_name(bj->jointype), es);
	ExplainPropertyText("LLM Table",
						quote_qualified_identifier(get_namespace_name(get_rel_namespace(table)),
												   get_rel_name(table)), es);
	ExplainPropertyText("Batched Keys", keys.data, es);
	ExplainPropertyInteger("Batch Size", NULL, bj->batch_size, es);
	if (rechecked != NIL)
		ExplainPropertyText("Join Filter",
							deparse_expression((Node *) make_ands_explicit(rechecked),
											   context, useprefix, false), es);
	if (es->analyze)
	{
		ExplainPropertyInteger("Batches", NULL, bj->nbatches, es);
		ExplainPropertyInteger("Requests", NULL, bj->nrequests, es);
	}
}

const CustomScanMethods llmfdw_batchjoin_scan_methods = {
	.CustomName = BATCHJOIN_NAME,
	.CreateCustomScanState = batchjoin_create_state,
};

static const CustomExecMethods batchjoin_exec_methods = {
	.CustomName = BATCHJOIN_NAME,
	.BeginCustomScan = batchjoin_begin,
	.ExecCustomScan = batchjoin_exec,
	.EndCustomScan = batchjoin_end,
	.ReScanCustomScan = batchjoin_rescan,
	.ExplainCustomScan = batchjoin_explain,
};
