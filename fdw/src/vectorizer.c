/*-------------------------------------------------------------------------
 *
 * vectorizer.c
 *		  The vectorizer's background workers: they drain the queues that
 *		  llm.create_vectorizer's triggers fill (fdw/llmfdw--0.2.0--0.3.0.sql).
 *
 * Registered only when llmfdw is in shared_preload_libraries.  A launcher
 * (connected to no database: it reads only pg_database) starts one worker
 * per database named in llmfdw.vectorizer_databases that exists, and starts
 * it again if it stops.  Each worker, every llmfdw.vectorizer_naptime (at
 * once while there is work):
 *
 *	- lists the vectorizers of its database (none until the extension is
 *	  0.3.0 or later there);
 *	- runs llm.run_vectorizer_batch(name, llmfdw.vectorizer_batch) for each,
 *	  one transaction per batch, with the vectorizer OWNER's rights
 *	  (SetUserIdAndSecContext with SECURITY_RESTRICTED_OPERATION, as
 *	  autovacuum runs index functions): never as superuser on a user's
 *	  behalf, and metered to the database's tenant like any query there;
 *	- catches an error per vectorizer (the transaction is aborted and the
 *	  error logged), so one broken vectorizer never stalls the others; one
 *	  that cannot run (an error, or -1: its sidecar is down, say) rests,
 *	  from the naptime doubling up to a minute, while the others go on.
 *
 * gRPC's threads never start in the postmaster: _PG_init registers workers
 * (and may preload Python's modules, python.c); a worker makes its channel,
 * like any backend, at its first llm.* query.  A worker killed mid-batch loses nothing: its
 * transaction never committed, so the batch's queue entries are still there
 * and the restarted worker takes them again (bgw_restart_time for the
 * launcher; the launcher restarts the database workers).
 *
 * A served database cannot be dropped while its worker is connected: use
 * DROP DATABASE ... WITH (FORCE), or remove it from the list first.
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_database.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"

/* At most this many databases are served (the rest of the list is ignored, with a warning). */
#define MAX_SERVED 32

static char *vectorizer_databases = NULL;
static int	vectorizer_naptime = 1000;	/* ms */
static int	vectorizer_batch = 512;

PGDLLEXPORT void llmfdw_vectorizer_launcher(Datum arg);
PGDLLEXPORT void llmfdw_vectorizer_worker(Datum arg);

void
llmfdw_vectorizer_init(void)
{
	BackgroundWorker worker;

	DefineCustomStringVariable("llmfdw.vectorizer_databases",
							   "Databases whose vectorizers the background worker drains.",
							   "Comma-separated names; empty: none.  Needs llmfdw in shared_preload_libraries.",
							   &vectorizer_databases, "llmfdw", PGC_SIGHUP, GUC_LIST_INPUT,
							   NULL, NULL, NULL);
	DefineCustomIntVariable("llmfdw.vectorizer_naptime",
							"How long a vectorizer worker sleeps when no queue has work due.",
							NULL, &vectorizer_naptime, 1000, 10, 3600 * 1000, PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("llmfdw.vectorizer_batch",
							"Rows a vectorizer worker embeds per transaction (one Embed request).",
							"Bigger batches come closer to the bulk UPDATE's rows/s (bench/bench_vectorizer.py: "
							"0.79x at 64, 0.94x at 512); a failing batch is split to find its failing rows.",
							&vectorizer_batch, 512, 1, 100000, PGC_SIGHUP, 0,
							NULL, NULL, NULL);
	if (!process_shared_preload_libraries_in_progress)
		return;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "llmfdw");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "llmfdw_vectorizer_launcher");
	snprintf(worker.bgw_name, BGW_MAXLEN, "llmfdw vectorizer launcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "llmfdw vectorizer launcher");
	RegisterBackgroundWorker(&worker);
}

/* Sleep up to `ms`, waking for a signal; reload the configuration when asked. */
static void
nap(long ms)
{
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, ms, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
	if (ConfigReloadPending)
	{
		ConfigReloadPending = false;
		ProcessConfigFile(PGC_SIGHUP);
	}
}

/* The names in llmfdw.vectorizer_databases (palloc'd in the current context). */
static List *
served_names(void)
{
	char	   *copy = pstrdup(vectorizer_databases);
	List	   *names = NIL;

	if (!SplitIdentifierString(copy, ',', &names))
	{
		ereport(WARNING, (errmsg("llmfdw.vectorizer_databases is not a list of names: \"%s\"", vectorizer_databases)));
		return NIL;
	}
	return names;
}

/* ---------------------------------------------------------------------
 * The launcher
 * --------------------------------------------------------------------- */

typedef struct Served
{
	Oid			dboid;
	BackgroundWorkerHandle *handle;
} Served;

/*
 * The database named `name` that accepts connections, else InvalidOid.  A
 * heap scan of pg_database, as the logical replication launcher reads
 * pg_subscription: connected to no database, the launcher cannot use the
 * catalog caches (get_database_oid fails there).
 */
static Oid
find_database(const char *name)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tuple;
	Oid			result = InvalidOid;

	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while (HeapTupleIsValid(tuple = heap_getnext(scan, ForwardScanDirection)))
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tuple);

		if (db->datallowconn && strcmp(NameStr(db->datname), name) == 0)
		{
			result = db->oid;
			break;
		}
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	return result;
}

static bool
start_worker(Oid dboid, const char *dbname, BackgroundWorkerHandle **handle)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;	/* the launcher starts it again */
	worker.bgw_main_arg = ObjectIdGetDatum(dboid);
	worker.bgw_notify_pid = MyProcPid;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "llmfdw");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "llmfdw_vectorizer_worker");
	snprintf(worker.bgw_name, BGW_MAXLEN, "llmfdw vectorizer for database %s", dbname);
	snprintf(worker.bgw_type, BGW_MAXLEN, "llmfdw vectorizer");
	return RegisterDynamicBackgroundWorker(&worker, handle);
}

void
llmfdw_vectorizer_launcher(Datum arg)
{
	Served		served[MAX_SERVED];
	int			nserved = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	for (;;)
	{
		MemoryContext pass = AllocSetContextCreate(TopMemoryContext, "llmfdw vectorizer launcher",
												   ALLOCSET_DEFAULT_SIZES);
		MemoryContext old = MemoryContextSwitchTo(pass);
		ListCell   *lc;

		foreach(lc, served_names())
		{
			const char *dbname = lfirst(lc);
			Oid			dboid;
			pid_t		pid;
			int			i;

			dboid = find_database(dbname);
			MemoryContextSwitchTo(pass);
			if (!OidIsValid(dboid))
				continue;		/* not (yet) created: looked for again next time */
			for (i = 0; i < nserved && served[i].dboid != dboid; i++)
				;
			if (i < nserved && GetBackgroundWorkerPid(served[i].handle, &pid) != BGWH_STOPPED)
				continue;
			if (i == nserved)
			{
				if (nserved == MAX_SERVED)
				{
					ereport(WARNING, (errmsg("llmfdw vectorizer: serving at most %d databases; %s is not served",
											 MAX_SERVED, dbname)));
					continue;
				}
				served[nserved++].dboid = dboid;
			}
			MemoryContextSwitchTo(TopMemoryContext);
			if (!start_worker(dboid, dbname, &served[i].handle))
			{
				ereport(WARNING, (errmsg("llmfdw vectorizer: no background worker slot for database %s", dbname),
								  errhint("Raise max_worker_processes.")));
				nserved--;
			}
			MemoryContextSwitchTo(pass);
		}
		MemoryContextSwitchTo(old);
		MemoryContextDelete(pass);
		/* a worker that stops wakes us (bgw_notify_pid); else look again now and then */
		nap(Max(vectorizer_naptime, 5000));
	}
}

/* ---------------------------------------------------------------------
 * A database's worker
 * --------------------------------------------------------------------- */

typedef struct Vectorizer
{
	char	   *name;
	Oid			owner;
} Vectorizer;

/*
 * Vectorizers that could not run (llm.run_vectorizer_batch returned -1, or
 * failed): each is left alone until its retry time, the wait doubling from
 * the naptime up to a minute, so a vectorizer whose sidecar is down neither
 * fills the log nor delays the others.
 */
#define MAX_BACKOFF_MS 60000
#define MAX_RESTING 64

typedef struct Resting
{
	char		name[NAMEDATALEN * 2];
	TimestampTz retry_at;
	int			wait_ms;
} Resting;

static Resting resting[MAX_RESTING];
static int	nresting = 0;

static Resting *
find_resting(const char *name)
{
	for (int i = 0; i < nresting; i++)
		if (strcmp(resting[i].name, name) == 0)
			return &resting[i];
	return NULL;
}

/* Whether `name` is resting now. */
static bool
is_resting(const char *name)
{
	Resting    *r = find_resting(name);

	return r != NULL && GetCurrentTimestamp() < r->retry_at;
}

/* Record the outcome of a batch: a failure rests the vectorizer (longer each time), success wakes it. */
static void
note_outcome(const char *name, bool failed)
{
	Resting    *r = find_resting(name);

	if (!failed)
	{
		if (r != NULL)
			*r = resting[--nresting];
		return;
	}
	if (r == NULL)
	{
		if (nresting == MAX_RESTING)
			return;
		r = &resting[nresting++];
		strlcpy(r->name, name, sizeof(r->name));
		r->wait_ms = 0;
	}
	r->wait_ms = Min(MAX_BACKOFF_MS, Max(vectorizer_naptime, r->wait_ms * 2));
	r->retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), r->wait_ms);
}

/* Whether this database is still in the list (else the worker ends). */
static bool
still_served(void)
{
	bool		found = false;
	char	   *dbname;
	ListCell   *lc;

	StartTransactionCommand();
	dbname = get_database_name(MyDatabaseId);
	foreach(lc, served_names())
		found |= (dbname != NULL && strcmp(lfirst(lc), dbname) == 0);
	CommitTransactionCommand();
	return found;
}

/* The vectorizers of this database, in `cxt` (none where the extension is older than 0.3.0). */
static List *
list_vectorizers(MemoryContext cxt)
{
	List	   *result = NIL;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "llmfdw vectorizer: listing vectorizers");
	if (SPI_execute("SELECT c.name, c.owner::oid FROM llm.vectorizer_config c ORDER BY c.name", true, 0) < 0)
		elog(ERROR, "llmfdw vectorizer: could not list the vectorizers");
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		MemoryContext old = MemoryContextSwitchTo(cxt);
		Vectorizer *v = palloc(sizeof(Vectorizer));

		v->name = SPI_getvalue(tuple, desc, 1);
		v->owner = DatumGetObjectId(SPI_getbinval(tuple, desc, 2, &isnull));
		result = lappend(result, v);
		MemoryContextSwitchTo(old);
	}
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
	return result;
}

/* Whether llm.vectorizer_config exists here: the extension is 0.3.0 or later. */
static bool
has_vectorizers(void)
{
	Oid			llm;
	bool		present;

	StartTransactionCommand();
	llm = get_namespace_oid("llm", true);
	present = OidIsValid(llm) && OidIsValid(get_relname_relid("vectorizer_config", llm));
	CommitTransactionCommand();
	return present;
}

/*
 * One batch of one vectorizer, as its owner, in a transaction of its own.
 * Returns the queue entries it took, or -1 when it failed (logged).
 */
static int
run_batch(const Vectorizer *v)
{
	MemoryContext cxt = CurrentMemoryContext;
	Oid			save_userid;
	int			save_sec;
	int			taken = -1;

	GetUserIdAndSecContext(&save_userid, &save_sec);
	PG_TRY();
	{
		Oid			types[2] = {TEXTOID, INT4OID};
		Datum		values[2] = {CStringGetTextDatum(v->name), Int32GetDatum(vectorizer_batch)};
		bool		isnull;
		char		activity[NAMEDATALEN + 64];

		/* now() is the transaction's start: a worker must set it (postgres.c does per statement) */
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		SetUserIdAndSecContext(v->owner, save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		snprintf(activity, sizeof(activity), "llmfdw vectorizer: %s", v->name);
		pgstat_report_activity(STATE_RUNNING, activity);
		if (SPI_execute_with_args("SELECT llm.run_vectorizer_batch($1, $2)", 2, types, values, NULL, false, 1)
			!= SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "llmfdw vectorizer: llm.run_vectorizer_batch returned no row");
		taken = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		SPI_finish();
		PopActiveSnapshot();
		SetUserIdAndSecContext(save_userid, save_sec);
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		SetUserIdAndSecContext(save_userid, save_sec);
		ereport(LOG, (errmsg("llmfdw vectorizer %s: %s", v->name, edata->message),
					  edata->hint ? errhint("%s", edata->hint) : 0));
		FreeErrorData(edata);
		taken = -1;
	}
	PG_END_TRY();
	pgstat_report_activity(STATE_IDLE, NULL);
	return taken;
}

void
llmfdw_vectorizer_worker(Datum arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(DatumGetObjectId(arg), InvalidOid, 0);
	SetConfigOption("application_name", "llmfdw vectorizer", PGC_USERSET, PGC_S_SESSION);
	/* names in the drain are schema-qualified; nothing may come from a user's schema */
	SetConfigOption("search_path", "pg_catalog", PGC_USERSET, PGC_S_SESSION);

	for (;;)
	{
		MemoryContext pass = AllocSetContextCreate(TopMemoryContext, "llmfdw vectorizer pass",
												   ALLOCSET_DEFAULT_SIZES);
		MemoryContext old = MemoryContextSwitchTo(pass);
		bool		busy = false;
		ListCell   *lc;

		if (!still_served())
			proc_exit(0);
		if (has_vectorizers())
		{
			foreach(lc, list_vectorizers(pass))
			{
				Vectorizer *v = lfirst(lc);
				int			taken;

				CHECK_FOR_INTERRUPTS();
				if (is_resting(v->name))
					continue;
				taken = run_batch(v);
				note_outcome(v->name, taken < 0);
				busy |= (taken >= vectorizer_batch);	/* a full batch: more may be due */
			}
		}
		MemoryContextSwitchTo(old);
		MemoryContextDelete(pass);
		if (busy)
		{
			CHECK_FOR_INTERRUPTS();
			continue;
		}
		nap(vectorizer_naptime);
	}
}
