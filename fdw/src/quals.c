/*-------------------------------------------------------------------------
 *
 * quals.c
 *		  Restriction clauses -> Multicorn Qual objects, and the join clauses
 *		  that can feed a parameterized scan.
 *
 * Supported forms (the column may be on either side of a commutable
 * operator; binary-compatible casts on the column are looked through):
 *	col OP value				Qual(col, "OP", value)
 *	col OP ANY|ALL (array)		Qual(col, ("OP", True|False), [values])
 *	col IS [NOT] NULL			Qual(col, "=" | "<>", None)
 *	boolcol / NOT boolcol		Qual(col, "=" | "<>", True)
 *	boolcol IS [NOT] TRUE|FALSE	Qual(col, "IS" | "IS NOT", True | False)
 *	boolcol IS [NOT] UNKNOWN	Qual(col, "IS" | "IS NOT", None)
 * "value" is anything without Vars and without volatile functions: a Const,
 * a Param (a join's outer value, an init-plan's result), a stable expression.
 * Other clauses are simply not pushed down: Postgres rechecks every clause
 * on the returned rows anyway, so nothing is ever silently wrong.
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/optimizer.h"
#include "optimizer/pathnode.h"
#include "optimizer/paths.h"
#include "optimizer/restrictinfo.h"
#include "utils/array.h"
#include "utils/lsyscache.h"

static Node *
strip_relabel(Node *node)
{
	while (node && IsA(node, RelabelType))
		node = (Node *) ((RelabelType *) node)->arg;
	return node;
}

/* attnum if node is a user column of relid, else 0. */
static AttrNumber
own_column(Node *node, Index relid)
{
	Var		   *var;

	node = strip_relabel(node);
	if (node == NULL || !IsA(node, Var))
		return 0;
	var = (Var *) node;
	if (var->varno != relid || var->varlevelsup != 0 || var->varattno <= 0)
		return 0;
	return var->varattno;
}

static bool
usable_value(Node *node)
{
	node = strip_relabel(node);
	return !contain_var_clause(node) && !contain_volatile_functions(node);
}

static LlmfdwQual *
make_qual(AttrNumber attnum, Oid opno, Node *value)
{
	LlmfdwQual *q = palloc0(sizeof(LlmfdwQual));

	q->attnum = attnum;
	q->opname = get_opname(opno);
	q->value = (Expr *) strip_relabel(value);
	q->value_type = exprType((Node *) q->value);
	return q;
}

static LlmfdwQual *
qual_from_clause(Node *clause, Index relid)
{
	if (IsA(clause, RestrictInfo))
		clause = (Node *) ((RestrictInfo *) clause)->clause;

	if (IsA(clause, OpExpr) && list_length(((OpExpr *) clause)->args) == 2)
	{
		OpExpr	   *op = (OpExpr *) clause;
		Node	   *left = linitial(op->args);
		Node	   *right = lsecond(op->args);
		Oid			opno = op->opno;
		AttrNumber	attnum = own_column(left, relid);

		if (attnum == 0)
		{
			/* value OP col: swap, if the operator has a commutator */
			attnum = own_column(right, relid);
			opno = get_commutator(opno);
			if (attnum == 0 || !OidIsValid(opno))
				return NULL;
			right = left;
		}
		if (!usable_value(right))
			return NULL;
		return make_qual(attnum, opno, right);
	}

	if (IsA(clause, ScalarArrayOpExpr))
	{
		ScalarArrayOpExpr *saop = (ScalarArrayOpExpr *) clause;
		AttrNumber	attnum = own_column(linitial(saop->args), relid);
		LlmfdwQual *q;

		if (attnum == 0 || !usable_value(lsecond(saop->args)))
			return NULL;
		q = make_qual(attnum, saop->opno, lsecond(saop->args));
		q->is_array = true;
		q->use_or = saop->useOr;
		return q;
	}

	if (IsA(clause, NullTest))
	{
		NullTest   *nt = (NullTest *) clause;
		AttrNumber	attnum = own_column((Node *) nt->arg, relid);
		LlmfdwQual *q;

		if (attnum == 0 || nt->argisrow)
			return NULL;
		q = palloc0(sizeof(LlmfdwQual));
		q->attnum = attnum;
		q->opname = pstrdup(nt->nulltesttype == IS_NULL ? "=" : "<>");
		q->is_null_test = true;
		q->value_type = UNKNOWNOID;
		return q;
	}

	/* boolcol IS [NOT] TRUE|FALSE|UNKNOWN */
	if (IsA(clause, BooleanTest))
	{
		BooleanTest *bt = (BooleanTest *) clause;
		AttrNumber	attnum = own_column((Node *) bt->arg, relid);
		LlmfdwQual *q;

		if (attnum == 0)
			return NULL;
		q = palloc0(sizeof(LlmfdwQual));
		q->attnum = attnum;
		q->opname = pstrdup(bt->booltesttype == IS_TRUE || bt->booltesttype == IS_FALSE ||
							bt->booltesttype == IS_UNKNOWN ? "IS" : "IS NOT");
		if (bt->booltesttype == IS_UNKNOWN || bt->booltesttype == IS_NOT_UNKNOWN)
		{
			q->is_null_test = true;
			q->value_type = UNKNOWNOID;
		}
		else
		{
			q->value = (Expr *) makeBoolConst(bt->booltesttype == IS_TRUE ||
											  bt->booltesttype == IS_NOT_TRUE, false);
			q->value_type = BOOLOID;
		}
		return q;
	}

	/* boolcol, NOT boolcol: Multicorn2's "= true" and "<> true" */
	{
		bool		positive = true;
		Node	   *arg = clause;
		AttrNumber	attnum;
		LlmfdwQual *q;

		if (is_notclause(arg))
		{
			positive = false;
			arg = (Node *) get_notclausearg((Expr *) arg);
		}
		attnum = own_column(arg, relid);
		if (attnum == 0 || exprType(arg) != BOOLOID)
			return NULL;
		q = palloc0(sizeof(LlmfdwQual));
		q->attnum = attnum;
		q->opname = pstrdup(positive ? "=" : "<>");
		q->value = (Expr *) makeBoolConst(true, false);
		q->value_type = BOOLOID;
		return q;
	}
}

/*
 * The pushable quals among clauses (RestrictInfos or bare expressions).
 * At plan time only constants have values; the FDW sees None for the rest
 * (Multicorn hides those quals from get_rel_size; showing them lets an FDW
 * know that col = ANY($1) will supply its required column).
 */
List *
llmfdw_extract_quals(List *clauses, Index relid)
{
	List	   *quals = NIL;
	ListCell   *lc;

	foreach(lc, clauses)
	{
		LlmfdwQual *q = qual_from_clause(lfirst(lc), relid);

		if (q != NULL)
			quals = lappend(quals, q);
	}
	return quals;
}

/* Compile the value expressions once per scan, not once per rescan. */
void
llmfdw_init_quals(List *quals, PlanState *parent)
{
	ListCell   *lc;

	foreach(lc, quals)
	{
		LlmfdwQual *q = lfirst(lc);

		if (q->value != NULL && !IsA(q->value, Const))
			q->value_state = ExecInitExpr(q->value, parent);
	}
}

/* Evaluate every qual's value (Params change on each rescan). */
void
llmfdw_eval_quals(List *quals, ExprContext *econtext)
{
	ListCell   *lc;

	foreach(lc, quals)
	{
		LlmfdwQual *q = lfirst(lc);

		if (q->is_null_test || q->value == NULL)
		{
			q->isnull = true;
			q->datum = (Datum) 0;
		}
		else if (IsA(q->value, Const))
		{
			q->datum = ((Const *) q->value)->constvalue;
			q->isnull = ((Const *) q->value)->constisnull;
		}
		else
			q->datum = ExecEvalExpr(q->value_state, econtext, &q->isnull);
	}
}

/*
 * NULL if an array value compared as a whole (col = '{a,b}', not col = ANY)
 * can be passed to Python; else a message saying why not.  A Python list has
 * neither several dimensions nor a lower bound: '{{a,b},{c,d}}' and
 * '[0:1]={a,b}' would both reach the FDW as ['a', 'b', ...], and a row that
 * echoes that list (a request column) fails Postgres's recheck, which
 * compares dimensions and bounds: a silently empty result.  Call with the
 * GIL held (detoasting can only fail for lack of memory).
 */
static char *
unrepresentable_array(LlmfdwQual *q, Datum datum, bool isnull)
{
	ArrayType  *arr;

	if (q->is_array || isnull || !OidIsValid(get_element_type(getBaseType(q->value_type))))
		return NULL;
	arr = DatumGetArrayTypeP(datum);
	if (ARR_NDIM(arr) > 1)
		return psprintf("%d dimensions", ARR_NDIM(arr));
	if (ARR_NDIM(arr) == 1 && ARR_LBOUND(arr)[0] != 1)
		return psprintf("lower bound %d", ARR_LBOUND(arr)[0]);
	return NULL;
}

/* Set a MulticornException (22023, with a hint) for an array value that has `why`. */
static void
raise_unrepresentable(const char *column, const char *why)
{
	PyObject   *exc = llmfdw_import_attr("multicorn.utils", "MulticornException");
	PyObject   *obj;

	if (exc == NULL)
		return;
	obj = PyObject_CallFunction(exc, "ssss",
								psprintf("the array compared with column \"%s\" has %s; "
										 "only one-dimensional arrays with lower bound 1 can be sent",
										 column, why),
								"Write it as ARRAY['a', 'b'] or '{a,b}' (one dimension, lower bound 1).",
								NULL, "22023");
	if (obj != NULL)
	{
		PyErr_SetObject(exc, obj);
		Py_DECREF(obj);
	}
	Py_DECREF(exc);
}

/*
 * A Python list of multicorn.Qual.  Call with the GIL held.  When values are
 * not known (plan time, EXPLAIN) only constants have values; the value of
 * anything else is None, as in Multicorn's EXPLAIN.  An array value that a
 * list cannot stand for (unrepresentable_array) is an error.
 */
PyObject *
llmfdw_quals_to_python(List *quals, LlmfdwColumn *columns, bool values_known)
{
	PyObject   *qual_class = llmfdw_multicorn_attr("Qual");
	PyObject   *result;
	ListCell   *lc;

	if (qual_class == NULL)
		return NULL;
	result = PyList_New(0);
	if (result == NULL)
	{
		Py_DECREF(qual_class);
		return NULL;
	}
	foreach(lc, quals)
	{
		LlmfdwQual *q = lfirst(lc);
		PyObject   *field;
		PyObject   *opname;
		PyObject   *op = NULL;
		PyObject   *value;
		PyObject   *qual = NULL;
		Datum		datum = q->datum;
		bool		isnull = q->isnull;
		bool		known = values_known || q->is_null_test;
		char	   *why;

		if (q->value != NULL && IsA(q->value, Const))
		{
			datum = ((Const *) q->value)->constvalue;
			isnull = ((Const *) q->value)->constisnull;
			known = true;
		}

		/* Each step only once the one before it worked: one error at a time. */
		field = llmfdw_text_to_python(columns[q->attnum - 1].name, -1);
		opname = field ? llmfdw_text_to_python(q->opname, -1) : NULL;
		if (opname != NULL && q->is_array)
			op = PyTuple_Pack(2, opname, q->use_or ? Py_True : Py_False);
		else
			op = Py_XNewRef(opname);

		if (op == NULL)
			value = NULL;
		else if (!known || q->is_null_test)
			value = Py_NewRef(Py_None);
		else if ((why = unrepresentable_array(q, datum, isnull)) != NULL)
		{
			raise_unrepresentable(columns[q->attnum - 1].name, why);
			value = NULL;
		}
		else
			value = llmfdw_datum_to_python(datum, isnull, q->value_type);
		if (value != NULL)
			qual = PyObject_CallFunctionObjArgs(qual_class, field, op, value, NULL);
		Py_XDECREF(field);
		Py_XDECREF(opname);
		Py_XDECREF(op);
		Py_XDECREF(value);
		if (qual == NULL || PyList_Append(result, qual) < 0)
		{
			Py_XDECREF(qual);
			Py_DECREF(result);
			Py_DECREF(qual_class);
			return NULL;
		}
		Py_DECREF(qual);
	}
	Py_DECREF(qual_class);
	return result;
}

/* ---------------------------------------------------------------------
 * Join clauses for parameterized paths
 * --------------------------------------------------------------------- */

typedef struct ColumnMatch
{
	Index		relid;
	AttrNumber	attnum;
} ColumnMatch;

static bool
ec_member_is_column(PlannerInfo *root, RelOptInfo *rel,
					EquivalenceClass *ec, EquivalenceMember *em, void *arg)
{
	ColumnMatch *m = arg;

	return own_column((Node *) em->em_expr, m->relid) == m->attnum;
}

/* Is clause "attnum = <something of other rels>"? */
static bool
is_equality_on(RestrictInfo *rinfo, Index relid, AttrNumber attnum)
{
	OpExpr	   *op;
	Node	   *other;

	if (!IsA(rinfo->clause, OpExpr))
		return false;
	op = (OpExpr *) rinfo->clause;
	if (list_length(op->args) != 2 || strcmp(get_opname(op->opno), "=") != 0)
		return false;
	if (own_column(linitial(op->args), relid) == attnum)
		other = lsecond(op->args);
	else if (own_column(lsecond(op->args), relid) == attnum)
		other = linitial(op->args);
	else
		return false;
	return !contain_volatile_functions(other);
}

/*
 * RestrictInfos "col = expression over other relations" that a scan of rel
 * parameterized by those relations could use: explicit join clauses, and
 * those the planner derives from equivalence classes (a.x = b.y AND
 * b.y = col also gives col = a.x).  Mirrors postgres_fdw's approach.
 */
List *
llmfdw_join_clauses_for(PlannerInfo *root, RelOptInfo *rel, AttrNumber attnum)
{
	List	   *result = NIL;
	ListCell   *lc;

	foreach(lc, rel->joininfo)
	{
		RestrictInfo *rinfo = lfirst(lc);

		if (join_clause_is_movable_to(rinfo, rel) &&
			is_equality_on(rinfo, rel->relid, attnum))
			result = lappend(result, rinfo);
	}

	if (rel->has_eclass_joins)
	{
		ColumnMatch m = {rel->relid, attnum};

		result = list_concat(result,
							 generate_implied_equalities_for_column(root, rel,
																	ec_member_is_column,
																	&m,
																	rel->lateral_referencers));
	}
	return result;
}
