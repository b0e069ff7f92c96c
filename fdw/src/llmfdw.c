/*-------------------------------------------------------------------------
 *
 * llmfdw.c
 *		  Module initialisation, GUCs and the handler of the llmfdw FDW host.
 *
 * A foreign server names a Python class (option "wrapper") written against
 * Multicorn2's API; each scan calls its get_rel_size / get_path_keys /
 * execute / explain / end_scan methods.  The callbacks live by phase, as in
 * contrib/postgres_fdw: plan.c (planner), scan.c (executor), option.c
 * (validator); joins that batch their requests are batchjoin_*.c.
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include "foreign/fdwapi.h"
#include "miscadmin.h"
#include "utils/guc.h"

PG_MODULE_MAGIC_EXT(.name = "llmfdw",.version = "0.2.0");

char	   *llmfdw_python_path = NULL;
bool		llmfdw_preload_python = true;

PG_FUNCTION_INFO_V1(llmfdw_handler);

void
_PG_init(void)
{
	DefineCustomStringVariable("llmfdw.python_path",
							   "Directories put in front of the embedded Python's sys.path.",
							   "Colon-separated; normally the site-packages of the venv that has llmfdw installed. "
							   "Read when a backend first starts Python, or at server start when Python is preloaded "
							   "(llmfdw.preload_python).",
							   &llmfdw_python_path,
							   "",
							   PGC_SUSET, 0,
							   NULL, NULL, NULL);
	DefineCustomBoolVariable("llmfdw.preload_python",
							 "Start Python and import the FDW's modules in the postmaster.",
							 "Only with llmfdw in shared_preload_libraries: every backend then inherits them "
							 "through fork instead of importing them at its first llm.* query.",
							 &llmfdw_preload_python,
							 true,
							 PGC_POSTMASTER, 0,
							 NULL, NULL, NULL);
	llmfdw_batchjoin_init();
	llmfdw_vectorizer_init();
	MarkGUCPrefixReserved("llmfdw");
	if (process_shared_preload_libraries_in_progress && !IsUnderPostmaster &&
		llmfdw_preload_python)
		llmfdw_python_preload();
}

Datum
llmfdw_handler(PG_FUNCTION_ARGS)
{
	FdwRoutine *routine = makeNode(FdwRoutine);

	/* plan.c */
	routine->GetForeignRelSize = llmfdwGetForeignRelSize;
	routine->GetForeignPaths = llmfdwGetForeignPaths;
	routine->GetForeignPlan = llmfdwGetForeignPlan;
	routine->GetForeignUpperPaths = llmfdwGetForeignUpperPaths;
	routine->PlanForeignModify = llmfdwPlanForeignModify;
	/* scan.c */
	routine->BeginForeignScan = llmfdwBeginForeignScan;
	routine->IterateForeignScan = llmfdwIterateForeignScan;
	routine->ReScanForeignScan = llmfdwReScanForeignScan;
	routine->EndForeignScan = llmfdwEndForeignScan;
	routine->ExplainForeignScan = llmfdwExplainForeignScan;
	/* instance.c */
	routine->ImportForeignSchema = llmfdw_import_foreign_schema;
	PG_RETURN_POINTER(routine);
}
