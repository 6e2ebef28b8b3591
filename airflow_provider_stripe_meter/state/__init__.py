"""The Airflow-facing side of what runs remember: the ledger and the subscriptions table on a
common-sql connection (:mod:`.ledger`, :mod:`.periods`), and full reports in object storage
(:mod:`.reports`). Nothing is kept in Airflow Variables or XCom beyond counts and samples."""
