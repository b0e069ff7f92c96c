/*-------------------------------------------------------------------------
 *
 * batchjoin.c
 *		  A batched nested loop: joins with an llmfdw table at the speed of
 *		  the bulk form, one request per batch of outer rows.
 *
 * A join such as "docs d JOIN llm.embeddings e ON e.input = d.body" plans
 * as a nested loop over a scan parameterized by d: one execute() call, so
 * one request to the sidecar, per outer row.  The sidecar is fast only when
 * it gets many inputs at once (one Embed request for all of them, or many
 * Generate calls that it decodes together).
 *
 * This file adds a CustomScan join through set_join_pathlist_hook.  Where a
 * nested loop could run the inner llmfdw scan parameterized by the outer
 * relation, the node reads up to llmfdw.join_batch_size outer rows, evaluates
 * the inner scan's parameter expressions on each, and calls execute() once
 * with "key = ANY(distinct values)" on the class's batchable key column (the
 * Python class names it in batch_key_columns).  Other key columns supplied by
 * the join (max_tokens = t.n) split the batch into groups, one execute() per
 * distinct combination of their values.  Each returned row echoes its key
 * columns (request_columns), which find the outer rows it belongs to; every
 * join clause is then rechecked on the pair, so the result is exactly the
 * nested loop's.  Rows are joined as they stream back: a LIMIT stops the
 * requests in flight, and no order is claimed.
 *
 * The scan tuple of the node (custom_scan_tlist) is the outer plan's output
 * followed by the inner columns the query needs.
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include <math.h>

#include "access/table.h"
#include "commands/explain.h"
#if PG_VERSION_NUM >= 180000
#include "commands/explain_format.h"
#include "commands/explain_state.h"
#endif
#include "executor/executor.h"
#include "executor/tuptable.h"
#include "foreign/foreign.h"
#include "miscadmin.h"
#include "nodes/extensible.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/cost.h"
#include "optimizer/optimizer.h"
#include "optimizer/pathnode.h"
#include "optimizer/paths.h"
#include "optimizer/restrictinfo.h"
#include "parser/parsetree.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/ruleutils.h"
#include "utils/selfuncs.h"

#define BATCHJOIN_NAME "LLM Batched Nested Loop"

/*
 * A batch also ends once its key values reach this size, well under the
 * sidecar's 64 MiB message limit: long texts that work one at a time must
 * not make a request the sidecar refuses.
 */
#define BATCH_MAX_BYTES (16 * 1024 * 1024)

/* GUC: outer rows per batch; 0 plans joins as plain nested loops. */
static int	join_batch_size = 1000;

static set_join_pathlist_hook_type prev_join_pathlist_hook = NULL;

/* ---------------------------------------------------------------------
 * Planner
 * --------------------------------------------------------------------- */

/* What the hook learnt about a join, kept in CustomPath.custom_private. */
typedef struct BatchJoinInfo
{
	JoinType	jointype;
	Index		inner_relid;
	Oid			inner_table;
	List	   *key_attnums;	/* first: the batched (= ANY) column */
	List	   *key_exprs;		/* outer expression supplying each key */
	List	   *restrict_clauses;	/* the inner rel's own restrictions */
	List	   *join_clauses;	/* decide whether a pair matches */
	List	   *other_clauses;	/* filter joined rows (outer joins) */
} BatchJoinInfo;

/*
 * Positions in CustomScan.custom_private (plain nodes, so that plans copy
 * and serialize) and custom_exprs.
 */
enum
{
	PRIV_JOINTYPE,
	PRIV_BATCH_SIZE,
	PRIV_TABLE,
	PRIV_KEY_ATTNUMS,
	PRIV_SCAN_MAP,				/* per scan column: inner attnum, or -1 */
	PRIV_NOUTER
};

enum
{
	EXPRS_KEYS,
	EXPRS_RESTRICT,
	EXPRS_JOIN
};

static const CustomPathMethods batchjoin_path_methods;
static const CustomScanMethods batchjoin_scan_methods;
static const CustomExecMethods batchjoin_exec_methods;

/* Is rel a plain foreign table served by this library's handler? */
static bool
is_llmfdw_rel(RelOptInfo *rel)
{
	ForeignServer *server;
	ForeignDataWrapper *fdw;
	FmgrInfo	finfo;

	if (rel->reloptkind != RELOPT_BASEREL || rel->rtekind != RTE_RELATION ||
		rel->fdwroutine == NULL || !OidIsValid(rel->serverid))
		return false;
	server = GetForeignServer(rel->serverid);
	fdw = GetForeignDataWrapper(server->fdwid);
	if (!OidIsValid(fdw->fdwhandler))
		return false;
	fmgr_info(fdw->fdwhandler, &finfo);
	return finfo.fn_addr == llmfdw_handler;
}

/* The attnums of the columns a Python attribute (a list of names) names. */
static List *
attnums_of(PyObject *instance, const char *attr, Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	List	   *result = NIL;
	LlmfdwPyState st;

	LLMFDW_WITH_PYTHON(st);
	{
		PyObject   *names;
		PyObject   *iter;
		PyObject   *name;

		if (!PyObject_HasAttrString(instance, attr))
			goto done;
		names = PyObject_GetAttrString(instance, attr);
		iter = names ? PyObject_GetIter(names) : NULL;
		Py_XDECREF(names);
		if (iter == NULL)
			llmfdw_raise_python_error(&st, psprintf("reading %s", attr));
		while ((name = PyIter_Next(iter)) != NULL)
		{
			const char *s = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : NULL;

			for (int i = 0; s != NULL && i < desc->natts; i++)
			{
				Form_pg_attribute att = TupleDescAttr(desc, i);

				if (!att->attisdropped && strcmp(NameStr(att->attname), s) == 0)
					result = list_append_unique_int(result, i + 1);
			}
			Py_DECREF(name);
			PyErr_Clear();
		}
		Py_DECREF(iter);
		if (PyErr_Occurred())
			llmfdw_raise_python_error(&st, psprintf("reading %s", attr));
done:
		;
	}
	LLMFDW_END_PYTHON(st);
	return result;
}

/* Does expression node name one of the attnums of relid? */
static bool
names_column(Node *node, Index relid, List *attnums)
{
	Bitmapset  *attnos = NULL;
	ListCell   *lc;

	pull_varattnos(node, relid, &attnos);
	if (bms_is_member(0 - FirstLowInvalidHeapAttributeNumber, attnos))
		return attnums != NIL;	/* a whole-row reference names them all */
	foreach(lc, attnums)
		if (bms_is_member(lfirst_int(lc) - FirstLowInvalidHeapAttributeNumber, attnos))
			return true;
	return false;
}

/*
 * If clause is "inner column = expression over other relations" with a
 * strict operator, return the column's attnum and set *outer_expr.
 */
static AttrNumber
equality_key(RestrictInfo *rinfo, Index relid, Expr **outer_expr)
{
	OpExpr	   *op;

	if (!IsA(rinfo->clause, OpExpr))
		return InvalidAttrNumber;
	op = (OpExpr *) rinfo->clause;
	if (list_length(op->args) != 2 || !op_strict(op->opno) ||
		strcmp(get_opname(op->opno), "=") != 0)
		return InvalidAttrNumber;
	for (int side = 0; side < 2; side++)
	{
		Node	   *col = list_nth(op->args, side);
		Node	   *other = list_nth(op->args, 1 - side);

		while (IsA(col, RelabelType))
			col = (Node *) ((RelabelType *) col)->arg;
		if (IsA(col, Var) && ((Var *) col)->varno == relid &&
			((Var *) col)->varlevelsup == 0 && ((Var *) col)->varattno > 0 &&
			!bms_is_member(relid, pull_varnos(NULL, other)) &&
			!contain_volatile_functions(other))
		{
			*outer_expr = (Expr *) other;
			return ((Var *) col)->varattno;
		}
	}
	return InvalidAttrNumber;
}

/*
 * The inner rel must give the join plain columns only: a placeholder or a
 * system column would need evaluation below the join, which has no scan.
 * Likewise the join may not compute placeholders of its own.
 */
static bool
plain_columns_only(RelOptInfo *joinrel, RelOptInfo *outerrel, RelOptInfo *innerrel)
{
	ListCell   *lc;

	foreach(lc, innerrel->reltarget->exprs)
	{
		Var		   *var = lfirst(lc);

		if (!IsA(var, Var) || var->varno != innerrel->relid || var->varattno < 0)
			return false;
	}
	foreach(lc, joinrel->reltarget->exprs)
	{
		Node	   *expr = lfirst(lc);

		if (IsA(expr, PlaceHolderVar) && !list_member(outerrel->reltarget->exprs, expr))
			return false;
	}
	return true;
}

/*
 * Work out how a batched nested loop would run this join with inner path
 * param_path, or return NULL where it cannot keep the nested loop's meaning
 * or its errors: every condition on a request column must still reach the
 * request, as check_request_columns (llmfdw.c) demands of a plain scan.
 */
static BatchJoinInfo *
analyse_join(RelOptInfo *joinrel, RelOptInfo *innerrel, Path *param_path,
			 JoinType jointype, JoinPathExtraData *extra,
			 List *request_attnums, List *batch_attnums)
{
	BatchJoinInfo *info = palloc0(sizeof(BatchJoinInfo));
	Index		relid = innerrel->relid;
	Relids		inner_and_outer = bms_union(innerrel->relids, PATH_REQ_OUTER(param_path));
	AttrNumber	batched = InvalidAttrNumber;
	Expr	   *batched_expr = NULL;
	ListCell   *lc;

	info->jointype = jointype;
	info->inner_relid = relid;

	foreach(lc, param_path->param_info->ppi_clauses)
	{
		RestrictInfo *rinfo = lfirst(lc);
		Expr	   *outer_expr = NULL;
		AttrNumber	attnum = equality_key(rinfo, relid, &outer_expr);

		info->join_clauses = lappend(info->join_clauses, rinfo->clause);
		if (attnum != InvalidAttrNumber && list_member_int(request_attnums, attnum))
		{
			if (list_member_int(info->key_attnums, attnum) || attnum == batched)
				continue;		/* a second value for it: only rechecked */
			if (batched == InvalidAttrNumber && list_member_int(batch_attnums, attnum))
			{
				batched = attnum;
				batched_expr = outer_expr;
				continue;
			}
			info->key_attnums = lappend_int(info->key_attnums, attnum);
			info->key_exprs = lappend(info->key_exprs, outer_expr);
		}
		else if (names_column((Node *) rinfo->clause, relid, request_attnums))
			return NULL;		/* the plain scan reports it */
	}
	if (batched == InvalidAttrNumber)
		return NULL;
	info->key_attnums = lcons_int(batched, info->key_attnums);
	info->key_exprs = lcons(batched_expr, info->key_exprs);

	foreach(lc, innerrel->baserestrictinfo)
	{
		RestrictInfo *rinfo = lfirst(lc);

		if (names_column((Node *) rinfo->clause, relid, request_attnums) &&
			llmfdw_extract_quals(list_make1(rinfo), relid) == NIL)
			return NULL;
		info->restrict_clauses = lappend(info->restrict_clauses, rinfo->clause);
	}

	/*
	 * As create_nestloop_path: clauses the inner path enforces are not
	 * repeated.  Pseudoconstant ones are kept: where a gating Result
	 * evaluates them too (custom_restrictinfo) that costs one more test.
	 */
	foreach(lc, extra->restrictlist)
	{
		RestrictInfo *rinfo = lfirst(lc);

		if (join_clause_is_movable_into(rinfo, innerrel->relids, inner_and_outer))
			continue;
		if (names_column((Node *) rinfo->clause, relid, request_attnums))
			return NULL;
		if (IS_OUTER_JOIN(jointype) && RINFO_IS_PUSHED_DOWN(rinfo, joinrel->relids))
			info->other_clauses = lappend(info->other_clauses, rinfo->clause);
		else
			info->join_clauses = lappend(info->join_clauses, rinfo->clause);
	}
	return info;
}

/*
 * Cost: the outer path, one inner startup per execute() call (per batch and
 * group of non-batched key values) instead of per outer row, the inner run
 * cost per distinct key value in each batch, and the join clauses per pair
 * of rows, as final_cost_nestloop counts them.  The first row comes once the
 * first batch is read and its first request started: rows stream back.
 */
static void
cost_batched_join(PlannerInfo *root, CustomPath *cpath, Path *outer, Path *inner,
				  BatchJoinInfo *info, int batch_size)
{
	double		outer_rows = Max(outer->rows, 1);
	double		nbatches = ceil(outer_rows / batch_size);
	double		distinct = estimate_num_groups(root, info->key_exprs, outer_rows, NULL, NULL);
	double		groups = 1;
	double		calls;
	double		lookups;
	double		pairs = outer_rows * Max(inner->rows, 1);
	Cost		inner_run = inner->total_cost - inner->startup_cost;
	Cost		outer_run = outer->total_cost - outer->startup_cost;
	QualCost	quals;

	if (list_length(info->key_exprs) > 1)
		groups = estimate_num_groups(root, list_delete_first(list_copy(info->key_exprs)),
									 outer_rows, NULL, NULL);
	calls = nbatches * Min(groups, batch_size);
	/* distinct values among a batch's rows, each row drawn from "distinct" */
	lookups = nbatches * distinct *
		(1.0 - pow(1.0 - 1.0 / distinct, Min(batch_size, outer_rows)));
	cost_qual_eval(&quals, list_concat(list_copy(info->join_clauses), info->restrict_clauses), root);

	/*
	 * Rows: the nested loop's own count of pairs where that is smaller than
	 * the join rel's estimate, which the unparameterized scan's guess (no
	 * usable key: "any number of rows") inflates; a Sort above then costs
	 * what it will sort.
	 */
	if (info->jointype == JOIN_INNER)
		cpath->path.rows = Min(cpath->path.parent->rows, pairs);
	else if (info->jointype == JOIN_LEFT)
		cpath->path.rows = Max(outer_rows, Min(cpath->path.parent->rows, pairs));
	else
		cpath->path.rows = cpath->path.parent->rows;
	cpath->path.rows = clamp_row_est(cpath->path.rows);

#if PG_VERSION_NUM >= 180000
	cpath->path.disabled_nodes = outer->disabled_nodes + inner->disabled_nodes +
		(enable_nestloop ? 0 : 1);
#endif
	cpath->path.startup_cost = outer->startup_cost +
		outer_run * Min(1.0, batch_size / outer_rows) + inner->startup_cost;
	cpath->path.total_cost = outer->total_cost +
		calls * inner->startup_cost + lookups * inner_run +
		outer_rows * cpu_tuple_cost + quals.startup +
		pairs * quals.per_tuple + cpath->path.rows * cpu_tuple_cost;
#if PG_VERSION_NUM < 180000
	if (!enable_nestloop)		/* before 18: disable_cost, not disabled_nodes */
	{
		cpath->path.startup_cost += disable_cost;
		cpath->path.total_cost += disable_cost;
	}
#endif
}

/*
 * set_join_pathlist_hook: offer the batched nested loop where the inner
 * side is an llmfdw table with a path parameterized by the outer side.
 */
static void
batchjoin_pathlist_hook(PlannerInfo *root, RelOptInfo *joinrel, RelOptInfo *outerrel,
						RelOptInfo *innerrel, JoinType jointype, JoinPathExtraData *extra)
{
	Path	   *outer = outerrel->cheapest_total_path;
	Path	   *best_inner = NULL;
	BatchJoinInfo *best = NULL;
	List	   *request_attnums;
	List	   *batch_attnums;
	PyObject   *instance;
	Relation	rel;
	Oid			table;
	ListCell   *lc;
	CustomPath *cpath;

	if (prev_join_pathlist_hook)
		prev_join_pathlist_hook(root, joinrel, outerrel, innerrel, jointype, extra);

	if (join_batch_size <= 0 ||
		(jointype != JOIN_INNER && jointype != JOIN_LEFT &&
		 jointype != JOIN_SEMI && jointype != JOIN_ANTI) ||
		outer == NULL || outer->param_info != NULL ||
		!bms_is_subset(innerrel->lateral_relids, outerrel->relids) ||
		!is_llmfdw_rel(innerrel) ||
		!plain_columns_only(joinrel, outerrel, innerrel))
		return;

	table = planner_rt_fetch(innerrel->relid, root)->relid;
	instance = llmfdw_get_instance(table);
	rel = table_open(table, NoLock);
	PG_TRY();
	{
		batch_attnums = attnums_of(instance, "batch_key_columns", rel);
		request_attnums = attnums_of(instance, "request_columns", rel);
	}
	PG_FINALLY();
	{
		LlmfdwPyState st;

		table_close(rel, NoLock);
		llmfdw_enter(&st);
		Py_DECREF(instance);
		llmfdw_leave(&st);
	}
	PG_END_TRY();
	if (batch_attnums == NIL)
		return;

	/* The inner path the plain nested loop would use, with the most keys. */
	foreach(lc, innerrel->pathlist)
	{
		Path	   *path = lfirst(lc);
		BatchJoinInfo *info;

		if (!IsA(path, ForeignPath) || path->param_info == NULL ||
			!bms_is_subset(PATH_REQ_OUTER(path), outerrel->relids))
			continue;
		info = analyse_join(joinrel, innerrel, path, jointype, extra,
							request_attnums, batch_attnums);
		if (info != NULL &&
			(best == NULL || list_length(info->key_attnums) > list_length(best->key_attnums)))
		{
			best = info;
			best_inner = path;
		}
	}
	if (best == NULL)
		return;
	best->inner_table = table;

	cpath = makeNode(CustomPath);
	cpath->path.pathtype = T_CustomScan;
	cpath->path.parent = joinrel;
	cpath->path.pathtarget = joinrel->reltarget;
	cpath->path.param_info = NULL;
	cpath->path.parallel_aware = false;
	cpath->path.parallel_safe = false;	/* Python runs in the leader only */
	cpath->path.pathkeys = NIL;		/* rows come out as requests complete */
	cpath->custom_paths = list_make1(outer);
#if PG_VERSION_NUM >= 170000
	cpath->custom_restrictinfo = extra->restrictlist;
#endif
	cpath->custom_private = list_make1(best);
	cpath->methods = &batchjoin_path_methods;
	cost_batched_join(root, cpath, outer, best_inner, best, join_batch_size);
	add_path(joinrel, (Path *) cpath);
}

/* ---- Path -> Plan ---- */

/* Position of a Var (by varno and varattno) in a tlist, or -1. */
static int
tlist_var_position(List *tlist, Var *var)
{
	ListCell   *lc;

	foreach(lc, tlist)
	{
		Var		   *tv = (Var *) ((TargetEntry *) lfirst(lc))->expr;

		if (IsA(tv, Var) && tv->varno == var->varno && tv->varattno == var->varattno)
			return foreach_current_index(lc);
	}
	return -1;
}

/*
 * setrefs.c matches each Var of the node's expressions to the scan tlist
 * including its nullingrels; a Var of the inner side carries the left
 * join's bit above the join (tlist, filter) but not in the join clauses.
 * The node computes both from one column, so give every Var in the
 * expressions it evaluates the nullingrels of its scan tlist entry.
 */
static Node *
match_nullingrels(Node *node, List *scan_tlist)
{
	if (node == NULL)
		return NULL;
	if (IsA(node, Var))
	{
		int			pos = tlist_var_position(scan_tlist, (Var *) node);
		Var		   *var;

		if (pos < 0)
			return node;
		var = copyObject((Var *) node);
#if PG_VERSION_NUM >= 160000	/* before 16, Vars carry no nullingrels */
		var->varnullingrels = ((Var *) ((TargetEntry *) list_nth(scan_tlist, pos))->expr)->varnullingrels;
#endif
		return (Node *) var;
	}
	if (IsA(node, PlaceHolderVar))
	{
		ListCell   *lc;

		foreach(lc, scan_tlist)
		{
			PlaceHolderVar *tp = (PlaceHolderVar *) ((TargetEntry *) lfirst(lc))->expr;

			if (IsA(tp, PlaceHolderVar) && tp->phid == ((PlaceHolderVar *) node)->phid)
				return (Node *) copyObject(tp);
		}
	}
	return expression_tree_mutator(node, match_nullingrels, scan_tlist);
}

/* Append to scan_tlist the Vars of the inner rel in node not yet there. */
static List *
add_inner_vars(List *scan_tlist, Node *node, Index relid)
{
	List	   *vars = pull_var_clause(node, PVC_RECURSE_AGGREGATES |
									   PVC_RECURSE_WINDOWFUNCS |
									   PVC_RECURSE_PLACEHOLDERS);
	ListCell   *lc;

	foreach(lc, vars)
	{
		Var		   *var = lfirst(lc);

		if (var->varno != relid || tlist_var_position(scan_tlist, var) >= 0)
			continue;
		scan_tlist = lappend(scan_tlist,
							 makeTargetEntry((Expr *) copyObject(var),
											 list_length(scan_tlist) + 1, NULL, false));
	}
	return scan_tlist;
}

static Plan *
batchjoin_plan(PlannerInfo *root, RelOptInfo *rel, CustomPath *best_path,
			   List *tlist, List *clauses, List *custom_plans)
{
	BatchJoinInfo *info = linitial(best_path->custom_private);
	Plan	   *outer_plan = linitial(custom_plans);
	CustomScan *cscan = makeNode(CustomScan);
	List	   *scan_tlist = NIL;
	List	   *scan_map = NIL;
	List	   *other = info->other_clauses;
	List	   *exprs;
	int			nouter;
	ListCell   *lc;

	/* Outer columns first, in the outer plan's order; then the inner ones. */
	foreach(lc, outer_plan->targetlist)
		scan_tlist = lappend(scan_tlist,
							 makeTargetEntry(copyObject(((TargetEntry *) lfirst(lc))->expr),
											 list_length(scan_tlist) + 1, NULL, false));
	nouter = list_length(scan_tlist);
	scan_tlist = add_inner_vars(scan_tlist, (Node *) list_make2(tlist, other), info->inner_relid);
	exprs = list_make3(info->key_exprs, info->restrict_clauses, info->join_clauses);
	scan_tlist = add_inner_vars(scan_tlist, (Node *) exprs, info->inner_relid);
	foreach(lc, scan_tlist)
		scan_map = lappend_int(scan_map, foreach_current_index(lc) < nouter ? -1 :
							   ((Var *) ((TargetEntry *) lfirst(lc))->expr)->varattno);

	cscan->scan.plan.targetlist = tlist;
	cscan->scan.plan.qual = (List *) match_nullingrels((Node *) other, scan_tlist);
	cscan->scan.scanrelid = 0;
	cscan->custom_plans = custom_plans;
	cscan->custom_exprs = (List *) match_nullingrels((Node *) exprs, scan_tlist);
	cscan->custom_private = list_make5(makeInteger(info->jointype),
									   makeInteger(join_batch_size),
									   makeInteger((int) info->inner_table),
									   list_copy(info->key_attnums),
									   scan_map);
	cscan->custom_private = lappend(cscan->custom_private, makeInteger(nouter));
	cscan->custom_scan_tlist = scan_tlist;
	cscan->methods = &batchjoin_scan_methods;
	return &cscan->scan.plan;
}

/* ---------------------------------------------------------------------
 * Executor
 * --------------------------------------------------------------------- */

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
	PyObject   *key_names;		/* tuple of str */
	int		   *key_positions;	/* among live columns, for sequence rows */

	List	   *restrict_quals; /* LlmfdwQual: sent with every request */
	ExprState  *join_qual;		/* restrictions and join clauses, rechecked */

	/* the inner table */
	PyObject   *instance;
	LlmfdwColumn *columns;
	int			natts;
	Bitmapset  *needed;
	LlmfdwRowStrings row;
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
	PyObject   *index;			/* dict: key tuple -> [row numbers] */
	PyObject   *requests;		/* list of qual lists, one per execute() */
	Py_ssize_t	next_request;
	PyObject   *iterator;
	int		   *matches;		/* rows the current inner row belongs to */
	int			nmatches;
	int			match_pos;

	/* EXPLAIN ANALYZE */
	int64		nbatches;
	int64		nrequests;

	MemoryContextCallback cleanup;
} BatchJoinState;

static Node *
batchjoin_create_state(CustomScan *cscan)
{
	BatchJoinState *bj = (BatchJoinState *) newNode(sizeof(BatchJoinState), T_CustomScanState);

	bj->css.methods = &batchjoin_exec_methods;
	return (Node *) bj;
}

/* Drop the batch's Python objects; closing the generator cancels its calls. */
static void
release_batch(BatchJoinState *bj, bool instance_too)
{
	LlmfdwPyState st;

	if (bj->iterator == NULL && bj->index == NULL && bj->requests == NULL &&
		!(instance_too && (bj->instance != NULL || bj->key_names != NULL)))
		return;
	llmfdw_enter(&st);
	if (bj->iterator != NULL && PyGen_Check(bj->iterator))
	{
		PyObject   *r = PyObject_CallMethod(bj->iterator, "close", NULL);

		Py_XDECREF(r);
		PyErr_Clear();
	}
	Py_CLEAR(bj->iterator);
	Py_CLEAR(bj->index);
	Py_CLEAR(bj->requests);
	if (instance_too)
	{
		Py_CLEAR(bj->instance);
		Py_CLEAR(bj->key_names);
	}
	llmfdw_leave(&st);
}

/* An aborted query never reaches EndCustomScan; its memory context reset does. */
static void
batchjoin_cleanup(void *arg)
{
	release_batch((BatchJoinState *) arg, true);
}

static void
batchjoin_begin(CustomScanState *node, EState *estate, int eflags)
{
	BatchJoinState *bj = (BatchJoinState *) node;
	CustomScan *cscan = (CustomScan *) node->ss.ps.plan;
	List	   *priv = cscan->custom_private;
	List	   *keys = list_nth(cscan->custom_exprs, EXPRS_KEYS);
	List	   *restricts = list_nth(cscan->custom_exprs, EXPRS_RESTRICT);
	List	   *joins = list_nth(cscan->custom_exprs, EXPRS_JOIN);
	List	   *key_attnums = list_nth(priv, PRIV_KEY_ATTNUMS);
	List	   *scan_map = list_nth(priv, PRIV_SCAN_MAP);
	Oid			table = (Oid) intVal(list_nth(priv, PRIV_TABLE));
	PlanState  *outer;
	Relation	rel;
	TupleDesc	desc;
	ListCell   *lc;
	ListCell   *lc2;
	LlmfdwPyState st;

	bj->jointype = (JoinType) intVal(list_nth(priv, PRIV_JOINTYPE));
	bj->batch_size = intVal(list_nth(priv, PRIV_BATCH_SIZE));
	bj->nouter = intVal(list_nth(priv, PRIV_NOUTER));
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
	bj->natts = desc->natts;
	bj->columns = llmfdw_columns(desc);
	bj->inner_slot = ExecInitExtraTupleSlot(estate, desc, &TTSOpsVirtual);
	bj->row.values = palloc0(sizeof(char *) * bj->natts);
	bj->row.lengths = palloc0(sizeof(int) * bj->natts);
	bj->row.nulls = palloc0(sizeof(bool) * bj->natts);
	bj->row.binary = palloc0(sizeof(bool) * bj->natts);
	for (int i = bj->nouter; i < bj->nscan; i++)
		for (int a = 1; a <= bj->natts; a++)
			if (bj->scan_map[i] == 0 || bj->scan_map[i] == a)
				bj->needed = bms_add_member(bj->needed, a);

	bj->nkeys = list_length(key_attnums);
	bj->key_attnums = palloc(sizeof(AttrNumber) * bj->nkeys);
	bj->key_states = palloc(sizeof(ExprState *) * bj->nkeys);
	bj->key_types = palloc(sizeof(Oid) * bj->nkeys);
	bj->key_typlen = palloc(sizeof(int16) * bj->nkeys);
	bj->key_typbyval = palloc(sizeof(bool) * bj->nkeys);
	bj->key_positions = palloc(sizeof(int) * bj->nkeys);
	forboth(lc, key_attnums, lc2, keys)
	{
		int			k = foreach_current_index(lc);
		AttrNumber	attnum = lfirst_int(lc);

		bj->key_attnums[k] = attnum;
		bj->needed = bms_add_member(bj->needed, attnum);
		bj->key_states[k] = ExecInitExpr(lfirst(lc2), &node->ss.ps);
		bj->key_types[k] = exprType(lfirst(lc2));
		get_typlenbyval(bj->key_types[k], &bj->key_typlen[k], &bj->key_typbyval[k]);
		bj->key_positions[k] = 0;
		for (int a = 1; a < attnum; a++)
			bj->key_positions[k] += !bj->columns[a - 1].dropped;
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

	bj->instance = llmfdw_get_instance(table);
	bj->cleanup.func = batchjoin_cleanup;
	bj->cleanup.arg = bj;
	MemoryContextRegisterResetCallback(estate->es_query_cxt, &bj->cleanup);
	LLMFDW_WITH_PYTHON(st);
	{
		bj->key_names = PyTuple_New(bj->nkeys);
		for (int k = 0; bj->key_names != NULL && k < bj->nkeys; k++)
		{
			PyObject   *name = llmfdw_text_to_python(bj->columns[bj->key_attnums[k] - 1].name, -1);

			if (name == NULL)
				break;
			PyTuple_SET_ITEM(bj->key_names, k, name);
		}
		if (PyErr_Occurred())
			llmfdw_raise_python_error(&st, "preparing a batched join");
	}
	LLMFDW_END_PYTHON(st);
}

/* ---- the batch ---- */

/* A value usable in a dict key: array values (lists) become tuples. */
static PyObject *
hashable(PyObject *value)
{
	PyObject   *result;

	if (!PyList_Check(value))
		return Py_NewRef(value);
	result = PyTuple_New(PyList_GET_SIZE(value));
	for (Py_ssize_t i = 0; result != NULL && i < PyList_GET_SIZE(value); i++)
	{
		PyObject   *item = hashable(PyList_GET_ITEM(value, i));

		if (item == NULL)
			Py_CLEAR(result);
		else
			PyTuple_SET_ITEM(result, i, item);
	}
	return result;
}

/* Qual(name, op, value); a new reference, or NULL with a Python error. */
static PyObject *
make_qual(PyObject *qual_class, PyObject *name, bool any, PyObject *value)
{
	PyObject   *op = any ? Py_BuildValue("(sO)", "=", Py_True) : PyUnicode_FromString("=");
	PyObject   *qual = op ? PyObject_CallFunctionObjArgs(qual_class, name, op, value, NULL) : NULL;

	Py_XDECREF(op);
	return qual;
}

/*
 * Add batch row i to the index (key tuple -> [row numbers]) and, if its key
 * is new, its first key value to its group (the values of the other keys ->
 * [their values, [first key values]]).  Call with the GIL held; false with
 * a Python error on failure.
 */
static bool
index_row(BatchJoinState *bj, int i, PyObject *groups)
{
	PyObject   *values = PyTuple_New(bj->nkeys);	/* as sent */
	PyObject   *key = PyTuple_New(bj->nkeys);	/* as looked up */
	PyObject   *number = PyLong_FromLong(i);
	PyObject   *rows = NULL;
	PyObject   *group = NULL;
	bool		ok = false;

	if (values == NULL || key == NULL || number == NULL)
		goto done;
	for (int k = 0; k < bj->nkeys; k++)
	{
		PyObject   *v = llmfdw_datum_to_python(bj->key_values[i * bj->nkeys + k], false,
											   bj->key_types[k]);

		if (v == NULL)
			goto done;
		PyTuple_SET_ITEM(values, k, v);
		if ((v = hashable(v)) == NULL)
			goto done;
		PyTuple_SET_ITEM(key, k, v);
	}
	rows = Py_XNewRef(PyDict_GetItemWithError(bj->index, key));
	if (rows == NULL)
	{
		PyObject   *entry;

		if (PyErr_Occurred() || (group = PyTuple_GetSlice(key, 1, bj->nkeys)) == NULL)
			goto done;
		entry = PyDict_GetItemWithError(groups, group);
		if (entry == NULL)
		{
			if (PyErr_Occurred())
				goto done;
			entry = Py_BuildValue("[ON]", values, PyList_New(0));
			if (entry == NULL || PyDict_SetItem(groups, group, entry) < 0)
			{
				Py_XDECREF(entry);
				goto done;
			}
			Py_DECREF(entry);	/* groups holds it */
		}
		if (PyList_Append(PyList_GET_ITEM(entry, 1), PyTuple_GET_ITEM(values, 0)) < 0 ||
			(rows = PyList_New(0)) == NULL ||
			PyDict_SetItem(bj->index, key, rows) < 0)
			goto done;
	}
	ok = (PyList_Append(rows, number) == 0);
done:
	Py_XDECREF(values);
	Py_XDECREF(key);
	Py_XDECREF(number);
	Py_XDECREF(rows);
	Py_XDECREF(group);
	return ok;
}

/*
 * Index the batch's rows by their key values and make one list of quals per
 * group of rows that share the values of the keys after the first: the
 * restrictions, "first = ANY(its distinct values)", and "key = value" for
 * the others.  Rows with a NULL key match nothing, as "col = NULL" does, and
 * are left out.  Call with the GIL held; false with a Python error.
 */
static bool
build_requests(BatchJoinState *bj, PyObject *restrictions)
{
	PyObject   *qual_class = llmfdw_multicorn_attr("Qual");
	PyObject   *groups = PyDict_New();
	PyObject   *entry;
	Py_ssize_t	pos = 0;
	bool		ok = false;

	bj->index = PyDict_New();
	bj->requests = PyList_New(0);
	if (qual_class == NULL || groups == NULL || bj->index == NULL || bj->requests == NULL)
		goto done;
	for (int i = 0; i < bj->nrows; i++)
	{
		bool		any_null = false;

		for (int k = 0; k < bj->nkeys; k++)
			any_null |= bj->key_nulls[i * bj->nkeys + k];
		if (!any_null && !index_row(bj, i, groups))
			goto done;
	}
	while (PyDict_Next(groups, &pos, NULL, &entry))
	{
		PyObject   *values = PyList_GET_ITEM(entry, 0);
		PyObject   *quals = PySequence_List(restrictions);

		for (int k = 0; quals != NULL && k < bj->nkeys; k++)
		{
			PyObject   *qual = make_qual(qual_class, PyTuple_GET_ITEM(bj->key_names, k), k == 0,
										 k == 0 ? PyList_GET_ITEM(entry, 1) : PyTuple_GET_ITEM(values, k));

			if (qual == NULL || PyList_Append(quals, qual) < 0)
				Py_CLEAR(quals);
			Py_XDECREF(qual);
		}
		if (quals == NULL || PyList_Append(bj->requests, quals) < 0)
		{
			Py_XDECREF(quals);
			goto done;
		}
		Py_DECREF(quals);
	}
	ok = true;
done:
	Py_XDECREF(qual_class);
	Py_XDECREF(groups);
	return ok;
}

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

	release_batch(bj, false);
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
		PyObject   *restrictions = llmfdw_quals_to_python(bj->restrict_quals, bj->columns, true);

		if (restrictions == NULL || !build_requests(bj, restrictions))
		{
			Py_XDECREF(restrictions);
			llmfdw_raise_python_error(&st, "preparing the requests of a batched join");
		}
		Py_DECREF(restrictions);
	}
	LLMFDW_END_PYTHON(st);
	bj->phase = PHASE_INNER;
}

/* Call execute() with the next request's quals. */
static void
start_request(BatchJoinState *bj, LlmfdwPyState *st)
{
	PyObject   *quals = PyList_GET_ITEM(bj->requests, bj->next_request);
	PyObject   *cols = llmfdw_column_names(bj->needed, bj->columns);
	PyObject   *result = cols ? PyObject_CallMethod(bj->instance, "execute", "OO", quals, cols) : NULL;

	bj->next_request++;
	bj->nrequests++;
	Py_XDECREF(cols);
	if (result == NULL)
		llmfdw_raise_python_error(st, "calling execute()");
	if (result != Py_None)
	{
		bj->iterator = PyObject_GetIter(result);
		if (bj->iterator == NULL)
		{
			Py_DECREF(result);
			llmfdw_raise_python_error(st, "execute() must return an iterable");
		}
	}
	Py_DECREF(result);
}

/*
 * The batch rows an inner row belongs to, by the key values it echoes: a
 * borrowed list, or NULL (with a Python error if the row lacks a key).
 */
static PyObject *
rows_for(BatchJoinState *bj, PyObject *item)
{
	bool		mapping = PyDict_Check(item) || (!PySequence_Check(item) && PyMapping_Check(item));
	PyObject   *key = PyTuple_New(bj->nkeys);
	PyObject   *rows;

	for (int k = 0; key != NULL && k < bj->nkeys; k++)
	{
		PyObject   *name = PyTuple_GET_ITEM(bj->key_names, k);
		PyObject   *v = mapping ? PyObject_GetItem(item, name)
			: PySequence_GetItem(item, bj->key_positions[k]);
		PyObject   *h = v ? hashable(v) : NULL;

		Py_XDECREF(v);
		if (h == NULL)
		{
			if (PyErr_ExceptionMatches(PyExc_KeyError) || PyErr_ExceptionMatches(PyExc_IndexError))
			{
				PyErr_Clear();
				PyErr_Format(PyExc_ValueError,
							 "a row returned by execute() lacks key column \"%U\", by which a batched "
							 "join matches it to its outer rows (SET llmfdw.join_batch_size = 0 avoids "
							 "batched joins)", name);
			}
			Py_CLEAR(key);
			break;
		}
		PyTuple_SET_ITEM(key, k, h);
	}
	if (key == NULL)
		return NULL;
	rows = PyDict_GetItemWithError(bj->index, key);
	Py_DECREF(key);
	return rows;
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
			PyObject   *rows;

			if (bj->iterator == NULL)
			{
				if (bj->next_request >= PyList_GET_SIZE(bj->requests))
					break;
				start_request(bj, &st);
				continue;
			}
			item = llmfdw_iter_next(bj->iterator);
			if (item == NULL)
			{
				if (PyErr_Occurred())
					llmfdw_raise_python_error(&st, "iterating over the result of execute()");
				Py_CLEAR(bj->iterator);
				continue;
			}
			rows = rows_for(bj, item);
			if (rows == NULL && PyErr_Occurred())
			{
				Py_DECREF(item);
				llmfdw_raise_python_error(&st, "matching a row returned by execute()");
			}
			if (rows != NULL)
			{
				for (Py_ssize_t j = 0; j < PyList_GET_SIZE(rows); j++)
					bj->matches[bj->nmatches++] = (int) PyLong_AsLong(PyList_GET_ITEM(rows, j));
				if (!llmfdw_row_to_strings(item, bj->columns, bj->natts, bj->needed, &bj->row))
				{
					Py_DECREF(item);
					llmfdw_raise_python_error(&st, "converting a row returned by execute()");
				}
				got = true;
			}
			Py_DECREF(item);
		}
		MemoryContextSwitchTo(old);
	}
	LLMFDW_END_PYTHON(st);

	if (got)
	{
		MemoryContext old = MemoryContextSwitchTo(bj->row_cxt);

		llmfdw_strings_to_slot(bj->inner_slot, bj->columns, &bj->row);
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
	release_batch((BatchJoinState *) node, true);
	ExecEndNode(linitial(node->custom_ps));
}

static void
batchjoin_rescan(CustomScanState *node)
{
	BatchJoinState *bj = (BatchJoinState *) node;
	PlanState  *outer = linitial(node->custom_ps);

	release_batch(bj, false);
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
	Oid			table = (Oid) intVal(list_nth(cscan->custom_private, PRIV_TABLE));
	List	   *context = set_deparse_context_plan(es->deparse_cxt, node->ss.ps.plan, ancestors);
	bool		useprefix = list_length(es->rtable) > 1 || es->verbose;
	List	   *rechecked = list_concat_copy(list_nth(cscan->custom_exprs, EXPRS_RESTRICT),
											 list_nth(cscan->custom_exprs, EXPRS_JOIN));
	StringInfoData keys;
	ListCell   *lc;

	initStringInfo(&keys);
	foreach(lc, (List *) list_nth(cscan->custom_exprs, EXPRS_KEYS))
	{
		int			k = foreach_current_index(lc);
		const char *value = deparse_expression(lfirst(lc), context, useprefix, false);

		appendStringInfo(&keys, k == 0 ? "%s = ANY(%s)" : ", %s = %s",
						 quote_identifier(bj->columns[bj->key_attnums[k] - 1].name), value);
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

static const CustomPathMethods batchjoin_path_methods = {
	.CustomName = BATCHJOIN_NAME,
	.PlanCustomPath = batchjoin_plan,
};

static const CustomScanMethods batchjoin_scan_methods = {
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

/* From _PG_init: the GUC, the plan node's methods, the planner hook. */
void
llmfdw_batchjoin_init(void)
{
	DefineCustomIntVariable("llmfdw.join_batch_size",
							"Outer rows whose keys a join with an llmfdw table sends in one request.",
							"Joins, UPDATE ... FROM and LATERAL queries run as a batched nested loop: "
							"one execute() per batch instead of per outer row. 0 turns it off.",
							&join_batch_size,
							1000, 0, 100000,
							PGC_USERSET, 0,
							NULL, NULL, NULL);
	RegisterCustomScanMethods(&batchjoin_scan_methods);
	prev_join_pathlist_hook = set_join_pathlist_hook;
	set_join_pathlist_hook = batchjoin_pathlist_hook;
}
