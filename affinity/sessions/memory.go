package sessions

// `store memory`: the process's session table alone, forgotten when the
// process stops (the module's behaviour before stores existed). Its
// handle has no backend: Lookup, Remember, Learn, Retire and Forget act
// on the table, and Sessions counts the table's entries. `store local`
// is the same table, written to Caddy's storage (local.go); `store
// redis` puts a shared backend behind it (redis.go).
