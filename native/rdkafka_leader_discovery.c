/*
 * Turns off librdkafka's KIP-951 leader discovery from Fetch and Produce responses.
 *
 * librdkafka 2.12.1 (bundled by rdkafka-sys 4.10) builds a metadata update from the
 * CurrentLeader tags of a Fetch or Produce response. A partition whose CurrentLeader has
 * LeaderId -1 is counted but not filled in, and the update then reads an uninitialised
 * topic (a NULL or stale name): a segmentation fault in rd_kafka_metadata_update_op
 * (confluentinc/librdkafka#5280, open). A broker that lost a partition answers just so:
 * Tansu restarted without its data did, and so can Kafka while a partition has no leader.
 *
 * build.rs links the binaries with -Wl,--wrap=rd_kafka_metadata_update_op, so librdkafka's
 * call lands here. The update is only a shortcut: the partition's error in the same
 * response (NOT_LEADER_OR_FOLLOWER, UNKNOWN_TOPIC_OR_PARTITION, ...) makes librdkafka
 * refresh its metadata from the broker the ordinary way, which is what happens here.
 * Returning RD_KAFKA_OP_RES_HANDLED (1) lets the caller free the operation.
 */
struct rd_kafka_s;
struct rd_kafka_metadata_internal_s;

int __wrap_rd_kafka_metadata_update_op(struct rd_kafka_s *rk,
                                       struct rd_kafka_metadata_internal_s *mdi) {
        (void)rk;
        (void)mdi;
        return 1; /* RD_KAFKA_OP_RES_HANDLED */
}
