//! Tests of `CopyFile`, `StatPath` and `ReadFile` in a temporary directory.

use std::os::unix::fs::MetadataExt;

use super::*;

/// `CopyFile` in the VM's root, as the service calls it: first message, then the rest.
async fn copy_file<S>(mut stream: S) -> Result<(), Status>
where
    S: Stream<Item = Result<CopyFileRequest, Status>> + Unpin + Send,
{
    let first = stream
        .next()
        .await
        .transpose()?
        .ok_or_else(|| Status::invalid_argument("empty"))?;
    super::copy_file(first, stream, &Scope::Vm).await
}

/// `StatPath` in the VM's root.
async fn stat_path(path: &str) -> Result<StatPathResponse, Status> {
    super::stat_path(path, false, &Scope::Vm).await
}

/// `ReadFile` in the VM's root.
async fn read_file(path: &str) -> Result<ReceiverStream<Result<ReadFileResponse, Status>>, Status> {
    super::read_file(path, &Scope::Vm).await
}

fn entry(path: &Path, kind: FileKind) -> CopyFileRequest {
    CopyFileRequest {
        path: path.to_string_lossy().into_owned(),
        kind: kind as i32,
        mode: 0o640,
        mtime_sec: 1_600_000_000,
        mtime_nsec: 123_456_789,
        ..CopyFileRequest::default()
    }
}

/// A file entry whose content comes in chunks of 1000 bytes.
fn file_stream(
    path: &Path,
    content: &[u8],
    size: u64,
) -> impl Stream<Item = Result<CopyFileRequest, Status>> + Unpin + Send {
    let mut first = entry(path, FileKind::File);
    first.size = size;
    let mut chunks = content.chunks(1000);
    first.data = chunks.next().unwrap_or_default().to_vec();
    let mut messages = vec![Ok(first)];
    messages.extend(chunks.map(|chunk| {
        Ok(CopyFileRequest {
            data: chunk.to_vec(),
            ..CopyFileRequest::default()
        })
    }));
    tokio_stream::iter(messages)
}

async fn read_back(path: &Path) -> Vec<u8> {
    let mut stream = read_file(&path.to_string_lossy()).await.expect("read");
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk").data;
        assert!(chunk.len() <= FILE_CHUNK_SIZE);
        data.extend(chunk);
    }
    data
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn copies_a_file_in_and_reads_it_back_with_mode_and_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data.bin");
    let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    copy_file(file_stream(&path, &content, content.len() as u64))
        .await
        .expect("copy");
    let meta = std::fs::metadata(&path).expect("stat");
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!(
        (meta.mtime(), meta.mtime_nsec()),
        (1_600_000_000, 123_456_789)
    );
    assert_eq!(read_back(&path).await, content);
    let stat = stat_path(&path.to_string_lossy()).await.expect("stat");
    assert_eq!(stat.kind, FileKind::File as i32);
    assert_eq!((stat.mode, stat.size), (0o640, content.len() as u64));
    assert_eq!(
        (stat.mtime_sec, stat.mtime_nsec),
        (1_600_000_000, 123_456_789)
    );
    // Copying again replaces the file; an empty file works too.
    copy_file(file_stream(&path, b"", 0))
        .await
        .expect("replace");
    assert_eq!(read_back(&path).await, b"");
    assert_eq!(names_in(dir.path()), ["data.bin"]);
}

#[tokio::test]
async fn copies_a_tree_and_lists_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("tree");
    let mut top = entry(&root, FileKind::Directory);
    top.mode = 0o750;
    copy_file(tokio_stream::iter(vec![Ok(top.clone())]))
        .await
        .expect("dir");
    copy_file(file_stream(&root.join("a.txt"), b"alpha", 5))
        .await
        .expect("file");
    let mut sub = entry(&root.join("sub/deeper"), FileKind::Directory);
    sub.parents = true;
    copy_file(tokio_stream::iter(vec![Ok(sub)]))
        .await
        .expect("nested dir with parents");
    let mut link = entry(&root.join("link"), FileKind::Symlink);
    link.link_target = "a.txt".into();
    copy_file(tokio_stream::iter(vec![Ok(link)]))
        .await
        .expect("symlink");
    // The directory's time is set last, after its content changed it.
    copy_file(tokio_stream::iter(vec![Ok(top)]))
        .await
        .expect("dir again");

    let stat = stat_path(&root.to_string_lossy()).await.expect("stat");
    assert_eq!(stat.kind, FileKind::Directory as i32);
    assert_eq!(stat.mode, 0o750);
    assert_eq!(stat.mtime_sec, 1_600_000_000);
    assert_eq!(stat.entries, ["a.txt", "link", "sub"]);
    let link = stat_path(&format!("{}/link", root.display()))
        .await
        .expect("stat link");
    assert_eq!(link.kind, FileKind::Symlink as i32);
    assert_eq!(link.link_target, "a.txt");
    assert_eq!(link.mtime_sec, 1_600_000_000);
    assert_eq!(read_back(&root.join("link")).await, b"alpha");
    let deeper = stat_path(&format!("{}/sub/deeper/", root.display()))
        .await
        .expect("trailing slash");
    assert_eq!(deeper.kind, FileKind::Directory as i32);
    assert!(deeper.entries.is_empty());
}

#[tokio::test]
async fn a_size_mismatch_or_a_broken_stream_leaves_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f");
    let err = copy_file(file_stream(&path, &[7; 5000], 6000))
        .await
        .expect_err("short");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("5000 of the announced 6000"),
        "{err:?}"
    );
    let err = copy_file(file_stream(&path, &[7; 5000], 4000))
        .await
        .expect_err("long");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let mut first = entry(&path, FileKind::File);
    first.size = 10;
    first.data = vec![1; 4];
    let broken = tokio_stream::iter(vec![Ok(first), Err(Status::cancelled("host went away"))]);
    let err = copy_file(broken).await.expect_err("broken");
    assert_eq!(err.code(), tonic::Code::Cancelled);
    assert!(
        names_in(dir.path()).is_empty(),
        "{:?}",
        names_in(dir.path())
    );
}

#[tokio::test]
async fn errors_name_the_path_with_the_right_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no/such/dir/f");
    let err = copy_file(file_stream(&missing, b"x", 1))
        .await
        .expect_err("missing parent");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains(&*missing.to_string_lossy()),
        "{err:?}"
    );
    std::fs::write(dir.path().join("plain"), b"").expect("write");
    let under_file = dir.path().join("plain/f");
    let err = copy_file(file_stream(&under_file, b"x", 1))
        .await
        .expect_err("parent is a file");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = copy_file(tokio_stream::iter(vec![Ok(entry(
        &dir.path().join("plain"),
        FileKind::Directory,
    ))]))
    .await
    .expect_err("directory over a file");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = stat_path(&missing.to_string_lossy())
        .await
        .expect_err("stat missing");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = read_file(&dir.path().to_string_lossy())
        .await
        .expect_err("read a directory");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let fifo = dir.path().join("fifo");
    let fifo_c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("path");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o600) }, 0);
    let err = read_file(&fifo.to_string_lossy())
        .await
        .expect_err("read a FIFO");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    for bad in ["relative/path", "/a/../b", "/a/./b", "/a\0b", "/"] {
        let mut request = entry(Path::new(bad), FileKind::File);
        request.path = bad.into();
        let err = copy_file(tokio_stream::iter(vec![Ok(request)]))
            .await
            .expect_err(bad);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}: {err:?}");
    }
    let mut mode = entry(&dir.path().join("m"), FileKind::Directory);
    mode.mode = 0o10000;
    let err = copy_file(tokio_stream::iter(vec![Ok(mode)]))
        .await
        .expect_err("bad mode");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let mut data = entry(&dir.path().join("d"), FileKind::Directory);
    data.data = b"x".to_vec();
    let err = copy_file(tokio_stream::iter(vec![Ok(data)]))
        .await
        .expect_err("data for a directory");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(names_in(dir.path()), ["fifo", "plain"]);
}

#[tokio::test]
async fn a_file_is_read_as_it_was_when_opened_and_proc_files_to_their_end() {
    // A file's size when opened bounds what is sent: bytes appended after the open
    // (here, before the first read) are not.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log");
    std::fs::write(&path, b"first\n").expect("write");
    let mut stream = read_file(&path.to_string_lossy()).await.expect("read");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut file| std::io::Write::write_all(&mut file, b"appended\n"))
        .expect("append");
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        data.extend(chunk.expect("chunk").data);
    }
    assert_eq!(data, b"first\n");
    // /proc's files report no size; they are read to their end.
    let status = read_back(Path::new("/proc/self/status")).await;
    assert!(
        String::from_utf8_lossy(&status).contains("Name:"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_followed_stat_describes_and_names_the_link_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = dir.path().join("real");
    std::fs::create_dir(&real).expect("mkdir");
    std::fs::write(real.join("f"), b"x").expect("write");
    std::os::unix::fs::symlink("real", dir.path().join("ln")).expect("link");
    std::os::unix::fs::symlink("real/f", dir.path().join("fl")).expect("link");
    let ln = dir.path().join("ln").to_string_lossy().into_owned();
    let plain = stat_path(&ln).await.expect("stat");
    assert_eq!(plain.kind, FileKind::Symlink as i32);
    assert!(plain.resolved_path.is_empty());
    let followed = super::stat_path(&ln, true, &Scope::Vm).await.expect("stat");
    assert_eq!(followed.kind, FileKind::Directory as i32);
    assert_eq!(followed.entries, ["f"]);
    let canonical = std::fs::canonicalize(&real).expect("canonical");
    assert_eq!(followed.resolved_path, canonical.to_string_lossy());
    let fl = dir.path().join("fl").to_string_lossy().into_owned();
    let followed = super::stat_path(&fl, true, &Scope::Vm).await.expect("stat");
    assert_eq!(followed.kind, FileKind::File as i32);
    assert_eq!(
        followed.resolved_path,
        canonical.join("f").to_string_lossy()
    );
    // A dangling link: nothing to follow to.
    std::os::unix::fs::symlink("gone", dir.path().join("dangling")).expect("link");
    let dangling = dir.path().join("dangling").to_string_lossy().into_owned();
    let err = super::stat_path(&dangling, true, &Scope::Vm)
        .await
        .expect_err("dangling");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
}

#[tokio::test]
async fn a_copy_never_replaces_a_fifo() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo");
    rustix::fs::mknodat(
        CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    let err = copy_file(file_stream(&fifo, b"data", 4))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("device, FIFO or socket"), "{err}");
    let meta = std::fs::symlink_metadata(&fifo).expect("still there");
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()));
    assert_eq!(names_in(dir.path()), ["fifo"], "no temporary file left");
}
