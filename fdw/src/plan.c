/*-------------------------------------------------------------------------
 *
 * plan.c
 *		  The planner callbacks of the llmfdw foreign scan: rel size, paths
 *		  (plain, parameterized, sorted), LIMIT pushdown, the plan, and the
 *		  check that every condition on a request column reaches the request.
 *
 * Parameterized paths built from the class's get_path_keys make joins reach
 * the FDW as one qual per outer row (or, through batchjoin_plan.c, as one
 * "= ANY" qual per batch of outer rows).
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include "access/stratnum.h"
#include "access/table.h"
#include "catalog/pg_collation.h"
#include "foreign/fdwapi.h"
#include "optimizer/optimizer.h"
#include "optimizer/pathnode.h"
#include "optimizer/planmain.h"
#include "optimizer/paths.h"
#include "optimizer/restrictinfo.h"
#include "optimizer/tlist.h"
#include "parser/parsetree.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

/*
 * Planner costs when the FDW class does not say: a request's fixed cost
 * (a round trip to the sidecar), and a width per column (the class's
 * get_rel_size() usually knows better).
 */
#define LLMFDW_DEFAULT_STARTUP_COST	20.0
#define LLMFDW_DEFAULT_COLUMN_WIDTH	100

/*
 * Added to the cost of a scan that would leave a join clause on a request
 * column outside the request: such a plan can only fail (see
 * check_request_columns), so the planner must prefer a parameterized one.
 */
#define LLMFDW_UNHONOURED_COST	1.0e9

/* Planning may end in an ERROR: the reset of its memory context releases the instance. */
static void
plan_cleanup(void *arg)
{
	LlmfdwPlan *plan = arg;

	llmfdw_release_python(&plan->instance, 1);
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

/* ---------------------------------------------------------------------
 * Planner
 * --------------------------------------------------------------------- */

void
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
	plan->width = natts * LLMFDW_DEFAULT_COLUMN_WIDTH;
	plan->startup_cost = LLMFDW_DEFAULT_STARTUP_COST;

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
		if (PyObject_HasAttrString(plan->instance, "get_rel_size"))
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
		if (PyObject_HasAttrString(plan->instance, "_startup_cost"))
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
	baserel->reltarget->width = plan->width;	/* get_rel_size's, as Multicorn2 */
	baserel->fdw_private = plan;

	/*
	 * The class's request_columns (our addition to the Multicorn API):
	 * columns whose values become part of the request and are echoed back in
	 * each row.  A condition on such a column that does not reach the request
	 * would filter rows the request never made, so check_request_columns
	 * refuses such plans.
	 */
	plan->request_attnums = llmfdw_attnums_of(plan->instance, "request_columns",
											  plan->columns, plan->natts);
}

/* One declared path key: the columns and the rows one lookup returns. */
typedef struct PathKeyDecl
{
	List	   *attnums;
	double		rows;
} PathKeyDecl;
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

		if (!PyObject_HasAttrString(plan->instance, "get_path_keys"))
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
				const char *s = name ? llmfdw_python_to_server(name) : NULL;
				AttrNumber	attnum = s ? llmfdw_attnum_by_name(plan->columns, plan->natts, s) : InvalidAttrNumber;

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
/* Is attnum compared with "=" (or "= ANY") in one of the quals? */
static bool
has_equality_qual(List *quals, AttrNumber attnum)
{
	ListCell   *lc;

	foreach(lc, quals)
	{
		LlmfdwQual *q = lfirst(lc);

		if (q->attnum == attnum && !q->is_null_test && strcmp(q->opname, "=") == 0 &&
			(!q->is_array || q->use_or))
			return true;
	}
	return false;
}

/* Does any of the quals name attnum, whatever the operator? */
static bool
has_any_qual(List *quals, AttrNumber attnum)
{
	ListCell   *lc;

	foreach(lc, quals)
		if (((LlmfdwQual *) lfirst(lc))->attnum == attnum)
			return true;
	return false;
}

/* ---------------------------------------------------------------------
 * Sort and LIMIT pushdown (Multicorn2's can_sort / can_limit)
 *
 * A sort key is a Node list, so that it can sit in fdw_private:
 * (String attname, Integer attnum, Boolean is_reversed, Boolean nulls_first,
 * String collation name or "").
 * --------------------------------------------------------------------- */

static List *
sort_key(const char *attname, AttrNumber attnum, bool reversed, bool nulls_first,
		 const char *collate)
{
	return list_make5(makeString(pstrdup(attname)), makeInteger(attnum),
					  makeBoolean(reversed), makeBoolean(nulls_first),
					  makeString(pstrdup(collate ? collate : "")));
}

/* A Python list of multicorn.SortKey; NULL with a Python error set.  GIL held. */
PyObject *
llmfdw_sortkeys_to_python(List *keys)
{
	PyObject   *cls = llmfdw_multicorn_attr("SortKey");
	PyObject   *result = cls ? PyList_New(0) : NULL;
	ListCell   *lc;

	foreach(lc, keys)
	{
		List	   *key = lfirst(lc);
		const char *collate = strVal(list_nth(key, 4));
		PyObject   *name = result ? llmfdw_text_to_python(strVal(linitial(key)), -1) : NULL;
		PyObject   *coll = name ? (collate[0] ? llmfdw_text_to_python(collate, -1) : Py_NewRef(Py_None)) : NULL;
		PyObject   *sk = coll ? PyObject_CallFunction(cls, "OiOOO", name, intVal(lsecond(key)),
													  boolVal(lthird(key)) ? Py_True : Py_False,
													  boolVal(lfourth(key)) ? Py_True : Py_False,
													  coll) : NULL;

		Py_XDECREF(name);
		Py_XDECREF(coll);
		if (sk == NULL || PyList_Append(result, sk) < 0)
			Py_CLEAR(result);
		Py_XDECREF(sk);
		if (result == NULL)
			break;
	}
	Py_XDECREF(cls);
	return result;
}

/*
 * The query's pathkeys (ORDER BY, or what GROUP BY, a window or a merge join
 * would like) as sort keys of columns of this table; NIL unless every one
 * is a plain column of it, as Multicorn2 asks.
 */
static List *
query_sort_keys(PlannerInfo *root, RelOptInfo *baserel, LlmfdwPlan *plan, List **pathkeys)
{
	List	   *keys = NIL;
	ListCell   *lc;

	*pathkeys = NIL;
	foreach(lc, root->query_pathkeys)
	{
		PathKey    *pk = lfirst(lc);
		EquivalenceClass *ec = pk->pk_eclass;
		Var		   *var = NULL;
		ListCell   *lc2;
		bool		reversed;

		if (ec->ec_has_volatile)
			return NIL;
		foreach(lc2, ec->ec_members)
		{
			EquivalenceMember *em = lfirst(lc2);
			Node	   *expr = (Node *) em->em_expr;

			while (expr && IsA(expr, RelabelType))
				expr = (Node *) ((RelabelType *) expr)->arg;
			if (bms_equal(em->em_relids, baserel->relids) && expr && IsA(expr, Var) &&
				((Var *) expr)->varno == baserel->relid && ((Var *) expr)->varattno > 0 &&
				((Var *) expr)->varattno <= plan->natts)
			{
				var = (Var *) expr;
				break;
			}
		}
		if (var == NULL)
		{
			*pathkeys = NIL;
			return NIL;
		}
#if PG_VERSION_NUM >= 180000
		reversed = (pk->pk_cmptype == COMPARE_GT);
#else
		reversed = (pk->pk_strategy == BTGreaterStrategyNumber);
#endif
		keys = lappend(keys, sort_key(plan->columns[var->varattno - 1].name, var->varattno,
									  reversed, pk->pk_nulls_first,
									  OidIsValid(ec->ec_collation) && ec->ec_collation != DEFAULT_COLLATION_OID
									  ? get_collation_name(ec->ec_collation) : NULL));
		*pathkeys = lappend(*pathkeys, pk);
	}
	return keys;
}

/*
 * can_sort(sortkeys) -> the keys execute() will sort by.  They (matched by
 * attnum) become plan->sortkeys and the pathkeys of the sorted paths.
 */
static void
plan_sort(PlannerInfo *root, RelOptInfo *baserel, LlmfdwPlan *plan)
{
	List	   *wanted_pathkeys;
	List	   *wanted = query_sort_keys(root, baserel, plan, &wanted_pathkeys);
	List	   *accepted = NIL;
	LlmfdwPyState st;

	if (wanted == NIL)
		return;
	LLMFDW_WITH_PYTHON(st);
	{
		bool		can = PyObject_HasAttrString(plan->instance, "can_sort");
		PyObject   *pykeys = can ? llmfdw_sortkeys_to_python(wanted) : NULL;
		PyObject   *res = pykeys ? PyObject_CallMethod(plan->instance, "can_sort", "O", pykeys) : NULL;
		PyObject   *iter;
		PyObject   *item;

		Py_XDECREF(pykeys);
		if (!can)
			res = Py_NewRef(Py_None);
		if (res == NULL)
			llmfdw_raise_python_error(&st, "calling can_sort()");
		iter = res == Py_None ? NULL : PyObject_GetIter(res);
		Py_DECREF(res);
		if (iter == NULL && PyErr_Occurred())
			llmfdw_raise_python_error(&st, "can_sort() must return a list of the SortKeys it was given");
		while (iter != NULL && (item = PyIter_Next(iter)) != NULL)
		{
			PyObject   *pyattnum = PyObject_GetAttrString(item, "attnum");
			long		attnum = pyattnum ? PyLong_AsLong(pyattnum) : -1;
			ListCell   *lc;
			ListCell   *lc2;

			Py_XDECREF(pyattnum);
			Py_DECREF(item);
			if (PyErr_Occurred())
			{
				Py_DECREF(iter);
				llmfdw_raise_python_error(&st, "can_sort() must return a list of the SortKeys it was given");
			}
			forboth(lc, wanted, lc2, wanted_pathkeys)
			{
				if (intVal(lsecond((List *) lfirst(lc))) == attnum &&
					!list_member_ptr(plan->sort_pathkeys, lfirst(lc2)))
				{
					accepted = lappend(accepted, lfirst(lc));
					plan->sort_pathkeys = lappend(plan->sort_pathkeys, lfirst(lc2));
				}
			}
		}
		Py_XDECREF(iter);
		if (PyErr_Occurred())
			llmfdw_raise_python_error(&st, "calling can_sort()");
	}
	LLMFDW_END_PYTHON(st);
	plan->sortkeys = accepted;
	plan->sort_pushed_down = accepted != NIL &&
		pathkeys_contained_in(root->sort_pathkeys, plan->sort_pathkeys);
}

/* add_path, and beside it the same path sorted by what can_sort() accepted. */
static void
add_scan_path(PlannerInfo *root, RelOptInfo *baserel, LlmfdwPlan *plan, ForeignPath *path)
{
	add_path(baserel, (Path *) path);
	if (plan->sort_pathkeys == NIL)
		return;
	add_path(baserel, (Path *)
			 create_foreignscan_path(root, baserel, NULL, path->path.rows, 0,
									 path->path.startup_cost, path->path.total_cost,
									 plan->sort_pathkeys, PATH_REQ_OUTER(&path->path), NULL, NIL,
									 list_make3(plan->sortkeys, makeInteger(-1), makeInteger(-1))));
}

void
llmfdwGetForeignPaths(PlannerInfo *root, RelOptInfo *baserel, Oid foreigntableid)
{
	LlmfdwPlan *plan = baserel->fdw_private;
	List	   *decls = declared_path_keys(plan);
	List	   *restrict_quals = llmfdw_extract_quals(baserel->baserestrictinfo, baserel->relid);
	List	   *key_attnums = list_copy(plan->request_attnums);
	List	   *joined = NIL;	/* key attnums that join clauses can supply */
	List	   *joined_clauses = NIL;	/* their join clauses, in the same order */
	bool		unhonoured = false;
	ListCell   *lc;
	Cost		total;

	foreach(lc, decls)
		key_attnums = list_concat_unique_int(key_attnums, ((PathKeyDecl *) lfirst(lc))->attnums);
	foreach(lc, key_attnums)
	{
		AttrNumber	attnum = lfirst_int(lc);
		List	   *clauses = llmfdw_join_clauses_for(root, baserel, attnum);

		if (clauses == NIL)
			continue;
		joined = lappend_int(joined, attnum);
		joined_clauses = lappend(joined_clauses, clauses);
		if (list_member_int(plan->request_attnums, attnum) &&
			!has_equality_qual(restrict_quals, attnum))
			unhonoured = true;
	}

	/* Multicorn2's costs: rows x width (never below the startup cost) */
	plan_sort(root, baserel, plan);
	total = Max(plan->startup_cost, baserel->rows * plan->width);
	if (unhonoured)
		total += LLMFDW_UNHONOURED_COST;
	add_scan_path(root, baserel, plan,
				  create_foreignscan_path(root, baserel, NULL, baserel->rows, 0,
										  plan->startup_cost, total,
										  NIL, NULL, NULL, NIL, NIL));
	if (joined == NIL)
		return;

	/*
	 * Parameterized paths.  Every key column that a join can supply is
	 * supplied by it, so that optional request columns (max_tokens = t.n)
	 * reach the request too: one path per way of supplying the first joined
	 * column, the others by their first join clause.  A path needs every
	 * column of some declared key, from a join clause or a constant.
	 */
	{
		double		rows = -1;
		List	   *seen = NIL;

		foreach(lc, decls)
		{
			PathKeyDecl *decl = lfirst(lc);
			bool		supplied = true;
			ListCell   *lc2;

			foreach(lc2, decl->attnums)
			{
				AttrNumber	attnum = lfirst_int(lc2);

				if (!list_member_int(joined, attnum) && !has_equality_qual(restrict_quals, attnum))
					supplied = false;
			}
			if (supplied && (rows < 0 || decl->rows < rows))
				rows = decl->rows;
		}
		if (rows < 0)
			return;				/* no declared key can be completed */

		foreach(lc, (List *) linitial(joined_clauses))
		{
			RestrictInfo *first = lfirst(lc);
			Relids		required = bms_copy(first->clause_relids);
			ListCell   *lc2;
			ParamPathInfo *ppi;

			for_each_from(lc2, joined_clauses, 1)
				required = bms_union(required,
									 ((RestrictInfo *) linitial((List *) lfirst(lc2)))->clause_relids);
			required = bms_union(required, baserel->lateral_relids);
			required = bms_del_member(required, baserel->relid);
			if (bms_is_empty(required) || list_member(seen, required))
				continue;
			seen = lappend(seen, required);

			ppi = get_baserel_parampathinfo(root, baserel, required);
			add_scan_path(root, baserel, plan,
						  create_foreignscan_path(root, baserel, NULL, rows, 0,
												  plan->startup_cost,
												  Max(plan->startup_cost, rows * plan->width),
												  NIL, ppi->ppi_req_outer, NULL, NIL, NIL));
		}
	}
}

/*
 * A wrong row is worse than an error.  Each request column (see
 * request_attnums) that some condition of the query names must reach the
 * request as "column = value": otherwise the row echoes a default the
 * condition then filters, and the query silently returns fewer rows.  Refuse
 * such a plan, naming the column.  Conditions the FDW class sees as quals
 * (max_tokens > 5) are left to the class, which raises its own error.
 */
/* attnum if node is (a relabelling of) a column of relid, else 0 */
static AttrNumber
column_of(Node *node, Index relid)
{
	while (node && IsA(node, RelabelType))
		node = (Node *) ((RelabelType *) node)->arg;
	if (node && IsA(node, Var) && ((Var *) node)->varno == relid &&
		((Var *) node)->varlevelsup == 0)
		return ((Var *) node)->varattno;
	return 0;
}

/*
 * Is clause "attnum = expression" or "attnum = ANY(expression)", where the
 * expression does not involve the scanned relation?  At plan time the
 * expression may still hold Vars of outer relations (they become Params
 * later), so this looks wider than llmfdw_extract_quals.
 */
static bool
is_request_equality(PlannerInfo *root, Node *clause, Index relid, AttrNumber attnum)
{
	Node	   *left;
	Node	   *right;
	Oid			opno;

	if (IsA(clause, OpExpr) && list_length(((OpExpr *) clause)->args) == 2)
	{
		opno = ((OpExpr *) clause)->opno;
		left = linitial(((OpExpr *) clause)->args);
		right = lsecond(((OpExpr *) clause)->args);
		if (column_of(right, relid) == attnum)
		{
			Node	   *tmp = left;

			left = right;
			right = tmp;
		}
	}
	else if (IsA(clause, ScalarArrayOpExpr) && ((ScalarArrayOpExpr *) clause)->useOr)
	{
		opno = ((ScalarArrayOpExpr *) clause)->opno;
		left = linitial(((ScalarArrayOpExpr *) clause)->args);
		right = lsecond(((ScalarArrayOpExpr *) clause)->args);
	}
	else
		return false;
	if (column_of(left, relid) != attnum || strcmp(get_opname(opno), "=") != 0)
		return false;
	return !bms_is_member(relid, pull_varnos(root, right));
}

static void
check_request_columns(PlannerInfo *root, RelOptInfo *baserel, LlmfdwPlan *plan,
					  List *clauses, const char *table)
{
	List	   *quals = llmfdw_extract_quals(clauses, baserel->relid);
	List	   *named = NIL;
	ListCell   *lc;
	Bitmapset  *attnos = NULL;
	int			x = -1;

	foreach(lc, clauses)
		pull_varattnos((Node *) lfirst(lc), baserel->relid, &attnos);
	foreach(lc, baserel->joininfo)
		pull_varattnos((Node *) ((RestrictInfo *) lfirst(lc))->clause, baserel->relid, &attnos);
	while ((x = bms_next_member(attnos, x)) >= 0)
		named = lappend_int(named, x + FirstLowInvalidHeapAttributeNumber);

	foreach(lc, plan->request_attnums)
	{
		AttrNumber	attnum = lfirst_int(lc);
		const char *col = plan->columns[attnum - 1].name;
		bool		sent = has_any_qual(quals, attnum);
		ListCell   *lc2;

		foreach(lc2, clauses)
			sent |= is_request_equality(root, (Node *) lfirst(lc2), baserel->relid, attnum);
		if (sent)
			continue;
		if (!list_member_int(named, attnum) &&
			llmfdw_join_clauses_for(root, baserel, attnum) == NIL)
			continue;
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("the condition on column \"%s\" of foreign table \"%s\" cannot become part of the request",
						col, table),
				 errdetail("Column \"%s\" is a request column: a condition on it must be sent to the model, "
						   "or it would filter rows made without it.", col),
				 errhint("Compare the column itself with = to a value of its type (%s = ...), or to a column "
						 "of another table in a join (%s = t.col); casts and expressions on it are not sent.",
						 col, col)));
	}
}

/*
 * LIMIT/OFFSET pushdown, on Multicorn2's terms: a SELECT of this one table,
 * constant LIMIT/OFFSET, no WITH TIES, its ORDER BY (if any) pushed down,
 * and can_limit(limit, offset) true.  Multicorn2 also wants no WHERE at all:
 * a class that does not apply a condition would return rows it filters,
 * and too few of them.  We accept conditions that every row the class
 * returns meets by construction: "column = value" / "= ANY" on its request
 * columns (see request_attnums), which it echoes from the request.  So
 * "prompt = ANY(...) LIMIT 1" starts one prompt, not all of them.
 */
static void
add_limit_path(PlannerInfo *root, RelOptInfo *baserel, LlmfdwPlan *plan,
			   RelOptInfo *final_rel, FinalPathExtraData *extra)
{
	Query	   *parse = root->parse;
	int64		limit = -1;
	int64		offset = -1;
	bool		ok = false;
	double		rows;
	List	   *sortkeys = NIL;
	List	   *pathkeys = NIL;
	PathTarget *target;
	ListCell   *lc;
	LlmfdwPyState st;

	if (!extra->limit_needed || parse->commandType != CMD_SELECT ||
		parse->limitOption == LIMIT_OPTION_WITH_TIES ||
		parse->rowMarks != NIL || parse->hasTargetSRFs)
		return;
	if (parse->limitCount)
	{
		Const	   *c = (Const *) parse->limitCount;

		if (!IsA(c, Const) || c->constisnull || c->consttype != INT8OID)
			return;
		limit = DatumGetInt64(c->constvalue);
	}
	if (parse->limitOffset)
	{
		Const	   *c = (Const *) parse->limitOffset;

		if (!IsA(c, Const) || c->constisnull || c->consttype != INT8OID)
			return;
		offset = DatumGetInt64(c->constvalue);
	}
	if (limit > PG_INT32_MAX || offset > PG_INT32_MAX || limit < -1 || offset < -1)
		return;
	if (root->sort_pathkeys != NIL)
	{
		if (!plan->sort_pushed_down)
			return;
		sortkeys = plan->sortkeys;
		pathkeys = root->sort_pathkeys;
	}
	foreach(lc, baserel->baserestrictinfo)
	{
		RestrictInfo *rinfo = lfirst(lc);
		bool		echoed = false;
		ListCell   *lc2;

		foreach(lc2, plan->request_attnums)
			echoed |= is_request_equality(root, (Node *) rinfo->clause, baserel->relid,
										  lfirst_int(lc2));
		if (!echoed)
			return;
	}

	LLMFDW_WITH_PYTHON(st);
	{
		bool		can = PyObject_HasAttrString(plan->instance, "can_limit");
		PyObject   *pylimit = limit >= 0 ? PyLong_FromLongLong(limit) : Py_NewRef(Py_None);
		PyObject   *pyoffset = offset >= 0 ? PyLong_FromLongLong(offset) : Py_NewRef(Py_None);
		PyObject   *res = (pylimit && pyoffset) ? (can ?
												   PyObject_CallMethod(plan->instance, "can_limit", "OO", pylimit, pyoffset) :
												   Py_NewRef(Py_False)) : NULL;
		int			truth = res ? PyObject_IsTrue(res) : -1;

		Py_XDECREF(pylimit);
		Py_XDECREF(pyoffset);
		Py_XDECREF(res);
		if (truth < 0)
			llmfdw_raise_python_error(&st, "calling can_limit()");
		ok = truth == 1;
	}
	LLMFDW_END_PYTHON(st);
	if (!ok)
		return;

	rows = limit >= 0 ? Min((double) limit, baserel->rows) : baserel->rows - Max(offset, 0);
	rows = clamp_row_est(rows);
	target = copy_pathtarget(root->upper_targets[UPPERREL_FINAL]);
	target->width = plan->width;	/* get_rel_size's, as for the scan */

	/*
	 * The path's parent is the base relation, as in Multicorn2: the plan is a
	 * scan of it (GetForeignPlan), with no Limit or Sort above.
	 */
	add_path(final_rel, (Path *)
			 create_foreign_upper_path(root, baserel, target,
									   rows, 0, plan->startup_cost,
									   Max(plan->startup_cost, rows * plan->width),
									   pathkeys, NULL, NIL,
									   list_make3(sortkeys, makeInteger((int) limit),
												  makeInteger((int) offset))));
}

/*
 * UPPERREL_ORDERED: remember the scan when its sort covers the ORDER BY (the
 * ordered rel's fdw_private points at the base rel); UPPERREL_FINAL: LIMIT.
 */
void
llmfdwGetForeignUpperPaths(PlannerInfo *root, UpperRelationKind stage,
						   RelOptInfo *input_rel, RelOptInfo *output_rel, void *extra)
{
	RelOptInfo *baserel;

	if (stage == UPPERREL_ORDERED)
	{
		if (input_rel->reloptkind == RELOPT_BASEREL && input_rel->fdw_private != NULL &&
			((LlmfdwPlan *) input_rel->fdw_private)->sort_pushed_down)
			output_rel->fdw_private = input_rel;
		return;
	}
	if (stage != UPPERREL_FINAL || extra == NULL)
		return;
	if (input_rel->reloptkind == RELOPT_BASEREL)
		baserel = input_rel;
	else if (input_rel->reloptkind == RELOPT_UPPER_REL && input_rel->fdw_private != NULL)
		baserel = input_rel->fdw_private;	/* set above, for the ordered rel */
	else
		return;
	if (baserel->fdw_private == NULL)
		return;
	add_limit_path(root, baserel, baserel->fdw_private, output_rel, extra);
}

ForeignScan *
llmfdwGetForeignPlan(PlannerInfo *root, RelOptInfo *baserel, Oid foreigntableid,
					 ForeignPath *best_path, List *tlist, List *scan_clauses,
					 Plan *outer_plan)
{
	LlmfdwPlan *plan = baserel->fdw_private;
	List	   *clauses = extract_actual_clauses(scan_clauses, false);
	List	   *exprs = list_concat(list_copy(baserel->reltarget->exprs), clauses);
	Bitmapset  *needed = needed_columns(exprs, baserel->relid, plan->natts);
	List	   *needed_list = NIL;
	List	   *pushed = best_path->fdw_private;	/* sortkeys, limit, offset */
	int			x = -1;

	while ((x = bms_next_member(needed, x)) >= 0)
		needed_list = lappend_int(needed_list, x);
	check_request_columns(root, baserel, plan, clauses, get_rel_name(foreigntableid));
	if (pushed == NIL)
		pushed = list_make3(NIL, makeInteger(-1), makeInteger(-1));

	/*
	 * Every clause is both rechecked (qual) and shown to the FDW (fdw_exprs),
	 * where the planner turns outer-relation Vars into Params for us.
	 */
	return make_foreignscan(tlist, clauses, baserel->relid,
							copyObject(clauses),
							lcons(needed_list, copyObject(pushed)),
							NIL, NIL, outer_plan);
}

/*
 * INSERT, UPDATE, DELETE: Multicorn2's write API (insert, update, delete,
 * rowid_column, bulk_insert) is not supported.  Postgres would say "cannot
 * insert into foreign table"; this says why, and names the class's method.
 */
List *
llmfdwPlanForeignModify(PlannerInfo *root, ModifyTable *plan, Index resultRelation,
						int subplan_index)
{
	RangeTblEntry *rte = planner_rt_fetch(resultRelation, root);
	const char *verb = plan->operation == CMD_INSERT ? "insert into" :
		plan->operation == CMD_UPDATE ? "update" :
		plan->operation == CMD_DELETE ? "delete from" : "merge into";
	const char *method = plan->operation == CMD_INSERT ? "insert" :
		plan->operation == CMD_UPDATE ? "update" : "delete";
	PyObject   *instance = llmfdw_get_instance(rte->relid);
	char	   *cls = NULL;
	bool		defines = false;
	LlmfdwPyState st;

	LLMFDW_WITH_PYTHON(st);
	{
		PyObject   *type = PyObject_GetAttrString((PyObject *) Py_TYPE(instance), "__qualname__");

		cls = type && PyUnicode_Check(type) ? llmfdw_python_to_server(type) : NULL;
		Py_XDECREF(type);
		PyErr_Clear();
		defines = PyObject_HasAttrString(instance, method);
		Py_DECREF(instance);
	}
	LLMFDW_END_PYTHON(st);

	ereport(ERROR,
			(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
			 errmsg("cannot %s foreign table \"%s\": llmfdw runs only the read side of Multicorn2's API",
					verb, get_rel_name(rte->relid)),
			 defines && cls
			 ? errdetail("Its FDW class %s defines %s(), but the write API (insert, update, delete, "
						 "rowid_column, bulk_insert) is not supported.", cls, method)
			 : errdetail("Foreign tables of llmfdw are read-only.")));
	return NIL;
}
