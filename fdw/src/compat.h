/*-------------------------------------------------------------------------
 *
 * compat.h
 *		  What llmfdw needs to build against more than one PostgreSQL major
 *		  version: shims that give older servers the spelling the code uses
 *		  (the newest, PostgreSQL 18's).  Tested: 15 and 18.
 *
 * Included from llmfdw.h right after postgres.h, so every file sees it.
 * What a header cannot paper over is guarded where it is used
 * (#if PG_VERSION_NUM ...):
 *	commands/explain_format.h, explain_state.h	18 (before: all in explain.h)
 *	Path.disabled_nodes (batchjoin_plan.c)		18 (before: disable_cost)
 *	CustomPath.custom_restrictinfo (batchjoin_plan.c) 17
 *	Var.varnullingrels (batchjoin_plan.c)		16
 *	WaitEventExtensionNew (rowsource.c)		17 (before: PG_WAIT_EXTENSION)
 *
 *-------------------------------------------------------------------------
 */
#ifndef LLMFDW_COMPAT_H
#define LLMFDW_COMPAT_H

#if PG_VERSION_NUM < 150000
#error "llmfdw needs PostgreSQL 15 or later"
#endif

/* 18 spells the noreturn marker pg_noreturn (C11 _Noreturn); before, an attribute. */
#ifndef pg_noreturn
#define pg_noreturn pg_attribute_noreturn()
#endif

/* 18 records the module's name and version in its magic block; before, only the ABI. */
#include "fmgr.h"
#ifndef PG_MODULE_MAGIC_EXT
#define PG_MODULE_MAGIC_EXT(...) PG_MODULE_MAGIC
#endif

/* 16 declares _PG_init in fmgr.h; before, each library declared its own. */
#if PG_VERSION_NUM < 160000
extern PGDLLEXPORT void _PG_init(void);
#endif

/*
 * The ForeignPath constructors: 17 added fdw_restrictinfo (the join's
 * clauses, for EvalPlanQual), 18 added disabled_nodes (enable_* = off
 * counts disabled nodes instead of adding disable_cost).  Calls use 18's
 * argument list; before 18, a disabled path instead gets disable_cost, and
 * before 17, fdw_restrictinfo (always NIL in llmfdw: it pushes no joins)
 * is dropped.  pathnode.h is included first so that its prototypes are
 * read before the macros exist.
 */
#if PG_VERSION_NUM < 180000
#include "optimizer/cost.h"
#include "optimizer/pathnode.h"

#define LLMFDW_DISABLED_COST(n)		((n) > 0 ? disable_cost * (n) : 0.0)

#if PG_VERSION_NUM >= 170000
#define create_foreignscan_path(root, rel, target, rows, disabled_nodes, startup_cost, total_cost, \
								pathkeys, required_outer, fdw_outerpath, fdw_restrictinfo, fdw_private) \
	(create_foreignscan_path) ((root), (rel), (target), (rows), \
							   (startup_cost) + LLMFDW_DISABLED_COST(disabled_nodes), \
							   (total_cost) + LLMFDW_DISABLED_COST(disabled_nodes), \
							   (pathkeys), (required_outer), (fdw_outerpath), (fdw_restrictinfo), (fdw_private))
#define create_foreign_join_path(root, rel, target, rows, disabled_nodes, startup_cost, total_cost, \
								 pathkeys, required_outer, fdw_outerpath, fdw_restrictinfo, fdw_private) \
	(create_foreign_join_path) ((root), (rel), (target), (rows), \
								(startup_cost) + LLMFDW_DISABLED_COST(disabled_nodes), \
								(total_cost) + LLMFDW_DISABLED_COST(disabled_nodes), \
								(pathkeys), (required_outer), (fdw_outerpath), (fdw_restrictinfo), (fdw_private))
#define create_foreign_upper_path(root, rel, target, rows, disabled_nodes, startup_cost, total_cost, \
								  pathkeys, fdw_outerpath, fdw_restrictinfo, fdw_private) \
	(create_foreign_upper_path) ((root), (rel), (target), (rows), \
								 (startup_cost) + LLMFDW_DISABLED_COST(disabled_nodes), \
								 (total_cost) + LLMFDW_DISABLED_COST(disabled_nodes), \
								 (pathkeys), (fdw_outerpath), (fdw_restrictinfo), (fdw_private))
#else
#define create_foreignscan_path(root, rel, target, rows, disabled_nodes, startup_cost, total_cost, \
								pathkeys, required_outer, fdw_outerpath, fdw_restrictinfo, fdw_private) \
	(create_foreignscan_path) ((root), (rel), (target), (rows), \
							   (startup_cost) + LLMFDW_DISABLED_COST(disabled_nodes), \
							   (total_cost) + LLMFDW_DISABLED_COST(disabled_nodes), \
							   (pathkeys), (required_outer), (fdw_outerpath), \
							   ((void) (fdw_restrictinfo), (fdw_private)))
#define create_foreign_join_path(root, rel, target, rows, disabled_nodes, startup_cost, total_cost, \
								 pathkeys, required_outer, fdw_outerpath, fdw_restrictinfo, fdw_private) \
	(create_foreign_join_path) ((root), (rel), (target), (rows), \
								(startup_cost) + LLMFDW_DISABLED_COST(disabled_nodes), \
								(total_cost) + LLMFDW_DISABLED_COST(disabled_nodes), \
								(pathkeys), (required_outer), (fdw_outerpath), \
								((void) (fdw_restrictinfo), (fdw_private)))
#define create_foreign_upper_path(root, rel, target, rows, disabled_nodes, startup_cost, total_cost, \
								  pathkeys, fdw_outerpath, fdw_restrictinfo, fdw_private) \
	(create_foreign_upper_path) ((root), (rel), (target), (rows), \
								 (startup_cost) + LLMFDW_DISABLED_COST(disabled_nodes), \
								 (total_cost) + LLMFDW_DISABLED_COST(disabled_nodes), \
								 (pathkeys), (fdw_outerpath), \
								 ((void) (fdw_restrictinfo), (fdw_private)))
#endif
#endif							/* PG_VERSION_NUM < 180000 */

#endif							/* LLMFDW_COMPAT_H */
