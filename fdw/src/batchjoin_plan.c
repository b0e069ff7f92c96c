/*-------------------------------------------------------------------------
 *
 * batchjoin_plan.c
 *		  A batched nested loop: joins with an llmfdw table at the speed of
 *		  the bulk form, one request per batch of outer rows.  This file
 *		  plans it; batchjoin_exec.c runs it.
 *
 * A join such as "docs d JOIN llm.embeddings e ON e.input = d.body" plans
 * as a nested loop over a scan parameterized by d: one execute() call, so
 * one request to the sidecar, per outer row.  The sidecar is fast only when
 * it gets many inputs at once (one Embed request for all of them, or many
 * Generate calls that it decodes together).
 *
 * This adds a CustomScan join through set_join_pathlist_hook.  Where a
 * nested loop could run the inner llmfdw scan parameterized by the outer
 * relation, the node reads up to llmfdw.join_batch_size outer rows, evaluates
 * the inner scan's parameter expressions on each, and calls execute() once
 * with "key = ANY(distinct values)" on the class's batchable key column (the
 * Python class names it in batch_key_columns).  Other key columns supplied by
 * the join (max_tokens = t.n) split the batch into groups, one execute() per
 * distinct combination of their values (multicorn._batchjoin groups them).
 * Each returned row echoes its key columns (request_columns), which find
 * the outer rows it belongs to; every join clause is then rechecked on the
 * pair, so the result is exactly the nested loop's.  Rows are joined as they stream back: a LIMIT stops the
 * requests in flight, and no order is claimed.
 *
 * The scan tuple of the node (custom_scan_tlist) is the outer plan's output
 * followed by the inner columns the query needs.
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include <math.h>

#include "foreign/foreign.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/cost.h"
#include "optimizer/optimizer.h"
#include "optimizer/pathnode.h"
#include "optimizer/paths.h"
#include "optimizer/restrictinfo.h"
#include "parser/parsetree.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/selfuncs.h"

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
	List	   *nestloop_clauses;	/* those a plain nested loop evaluates too */
} BatchJoinInfo;

static const CustomPathMethods batchjoin_path_methods;

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
 * request, as check_request_columns (plan.c) demands of a plain scan.
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
		info->nestloop_clauses = lappend(info->nestloop_clauses, rinfo->clause);
		if (IS_OUTER_JOIN(jointype) && RINFO_IS_PUSHED_DOWN(rinfo, joinrel->relids))
			info->other_clauses = lappend(info->other_clauses, rinfo->clause);
		else
			info->join_clauses = lappend(info->join_clauses, rinfo->clause);
	}
	return info;
}

/*
 * Cost in requests.  The plain nested loop makes one request per outer row:
 * the inner path's whole cost (its startup, a round trip to the sidecar,
 * plus its rows) for each.  The node makes one request per batch and group
 * of non-batched key values, at the inner startup each, and looks up each
 * distinct key of a batch once, at the inner run cost: never more requests
 * or lookups than outer rows.  It then forms each pair of rows, as
 * final_cost_nestloop counts them, and evaluates the clauses the nested
 * loop would evaluate at the join (the inner scan's own recheck of its
 * parameter clauses is not costed in either plan).
 *
 * With one outer row both plans make one request and cost the same, and
 * near that size they differ by less than add_path's fuzz, which then
 * prefers the nested loop's earlier first row: the plan would flip with
 * the estimate.  As the node never does more work, it is costed at most
 * BATCHJOIN_MAX_COST_SHARE of the plain nested loop over the same paths.
 * The first row comes once the first batch is read and its first request
 * started: rows stream back.
 */
#define BATCHJOIN_MAX_COST_SHARE 0.98

static void
cost_batched_join(PlannerInfo *root, CustomPath *cpath, Path *outer, Path *inner,
				  BatchJoinInfo *info, int batch_size)
{
	double		outer_rows = Max(outer->rows, 1);
	double		nbatches = ceil(outer_rows / batch_size);
	double		batch_rows = outer_rows / nbatches;
	double		distinct = Max(estimate_num_groups(root, info->key_exprs, outer_rows, NULL, NULL), 1);
	double		groups = 1;
	double		requests;
	double		lookups;
	double		pairs = outer_rows * Max(inner->rows, 1);
	Cost		inner_run = inner->total_cost - inner->startup_cost;
	Cost		outer_run = outer->total_cost - outer->startup_cost;
	Cost		plain;
	QualCost	quals;

	if (list_length(info->key_exprs) > 1)
		groups = estimate_num_groups(root, list_delete_first(list_copy(info->key_exprs)),
									 outer_rows, NULL, NULL);
	requests = Max(1, Min(outer_rows, nbatches * Min(groups, batch_rows)));
	/*
	 * Distinct values among a batch's rows: each value has outer/distinct
	 * rows, and is in a batch unless all of them fall outside it (all the
	 * values when there is one batch, batch_rows of them when all differ).
	 */
	lookups = Min(outer_rows, nbatches * distinct *
				  (1.0 - pow(1.0 - batch_rows / outer_rows, outer_rows / distinct)));
	cost_qual_eval(&quals, info->nestloop_clauses, root);

	/*
	 * Rows: the nested loop's own count of pairs where that is smaller than
	 * the join rel's estimate (see fix_join_rows).
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
	plain = outer->total_cost + outer_rows * inner->total_cost +
		pairs * (cpu_tuple_cost + quals.per_tuple) + quals.startup;
	cpath->path.total_cost = outer->total_cost +
		requests * inner->startup_cost + lookups * inner_run +
		quals.startup + pairs * (cpu_tuple_cost + quals.per_tuple);
	cpath->path.total_cost = Min(cpath->path.total_cost, BATCHJOIN_MAX_COST_SHARE * plain);
	cpath->path.startup_cost = Min(cpath->path.startup_cost, cpath->path.total_cost);
#if PG_VERSION_NUM < 180000
	if (!enable_nestloop)		/* before 18: disable_cost, not disabled_nodes */
	{
		cpath->path.startup_cost += disable_cost;
		cpath->path.total_cost += disable_cost;
	}
#endif
}

/*
 * The join rel's row estimate comes from eqjoinsel, which knows nothing of
 * the inner column (no statistics: 200 distinct values) and multiplies by
 * the unparameterized scan's guess (get_rel_size: no usable key, "any
 * number of rows"), giving about a billion rows for any outer size.  Each
 * key value yields the rows one lookup returns (the parameterized path's
 * rows), so an inner or left join has at most outer rows times that.  Fix
 * the estimate here, where the lookup is known, for the paths already built
 * on it and for those to come and the joins above.
 */
static void
fix_join_rows(RelOptInfo *joinrel, Path *outer, Path *inner, JoinType jointype)
{
	double		pairs = Max(outer->rows, 1) * Max(inner->rows, 1);
	double		old = joinrel->rows;
	double		rows;
	ListCell   *lc;

	if (jointype == JOIN_INNER)
		rows = Min(old, pairs);
	else if (jointype == JOIN_LEFT)
		rows = Min(old, Max(outer->rows, pairs));
	else
		return;
	rows = clamp_row_est(rows);
	if (rows >= old)
		return;
	joinrel->rows = rows;
	foreach(lc, joinrel->pathlist)
	{
		Path	   *path = lfirst(lc);

		if (path->param_info == NULL && path->rows == old)
			path->rows = rows;
	}
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
	LlmfdwPlan *plan;
	Oid			table;
	ListCell   *lc;
	CustomPath *cpath;

	if (prev_join_pathlist_hook)
		prev_join_pathlist_hook(root, joinrel, outerrel, innerrel, jointype, extra);

	if ((jointype != JOIN_INNER && jointype != JOIN_LEFT &&
		 jointype != JOIN_SEMI && jointype != JOIN_ANTI) ||
		outer == NULL || outer->param_info != NULL ||
		!bms_is_subset(innerrel->lateral_relids, outerrel->relids) ||
		!is_llmfdw_rel(innerrel) ||
		!plain_columns_only(joinrel, outerrel, innerrel))
		return;

	/* GetForeignRelSize (plan.c) has planned the inner rel's scan. */
	plan = innerrel->fdw_private;
	table = planner_rt_fetch(innerrel->relid, root)->relid;
	request_attnums = plan->request_attnums;
	batch_attnums = llmfdw_attnums_of(plan->instance, "batch_key_columns",
									  plan->columns, plan->natts);
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
	fix_join_rows(joinrel, outer, best_inner, jointype);
	if (join_batch_size <= 0)
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
	/* in the order of BatchJoinExprsIndex */
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
	/* in the order of BatchJoinPrivateIndex */
	cscan->custom_private = list_make5(makeInteger(info->jointype),
									   makeInteger(join_batch_size),
									   makeInteger((int) info->inner_table),
									   list_copy(info->key_attnums),
									   scan_map);
	cscan->custom_private = lappend(cscan->custom_private, makeInteger(nouter));
	cscan->custom_scan_tlist = scan_tlist;
	cscan->methods = &llmfdw_batchjoin_scan_methods;
	return &cscan->scan.plan;
}

static const CustomPathMethods batchjoin_path_methods = {
	.CustomName = BATCHJOIN_NAME,
	.PlanCustomPath = batchjoin_plan,
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
	RegisterCustomScanMethods(&llmfdw_batchjoin_scan_methods);
	prev_join_pathlist_hook = set_join_pathlist_hook;
	set_join_pathlist_hook = batchjoin_pathlist_hook;
}
